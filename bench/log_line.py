"""CPU per request log line: `python -m bench.log_line` (lines go to /dev/null).

A request writes one line after settlement (gateway/request_log.py); this is what that
costs, as process CPU time (less skewed by a busy machine than wall time), in both formats
and for a line below the level (not written).
"""

from __future__ import annotations

import os
import sys
import time
import timeit

from gateway.request_log import LEVELS, CallReport, RequestLog
from gateway.settings import LogSettings

LINES = 50_000
REPORT = CallReport(
    route="/v1/chat/completions", session_id="sess_" + "0" * 24, assembly_id="asm_" + "a" * 32, tenant="acme",
    model="gpt-4o-mini", served_by="gpt-4o-mini", status=200, tokens_in=12, tokens_out=48, cost_nanos=30600,
    gateway_ms=0.412, upstream_ms=1.234, stream=False,
)


def per_line(settings: LogSettings) -> float:
    log = RequestLog(settings)
    runs = timeit.repeat(lambda: log.write("req_" + "0" * 24, REPORT, level=LEVELS["info"]), number=LINES, repeat=5, timer=time.process_time)
    return min(runs) / LINES * 1e6


def main() -> None:
    out = sys.stdout
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        try:
            figures = {
                "json": per_line(LogSettings(format="json")),
                "text": per_line(LogSettings(format="text")),
                "below the level": per_line(LogSettings(level="warning")),
            }
        finally:
            sys.stderr = sys.__stderr__
    for name, micros in figures.items():
        print(f"{name:>16}: {micros:.2f} µs CPU per line", file=out)


if __name__ == "__main__":
    main()
