"""`python -m bench.dialects`: the gateway's CPU per call on the Responses API and Anthropic
Messages routes, next to chat completions, in one run against the bench's mock upstream.

The mock speaks chat completions, so both dialects take the translation path (the common
case: vLLM, Ollama): request to chat form, PEP, budget, journal, answer back to the
dialect. Same gateway, same session, same pinning as `python -m bench`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench.httpcall import call
from bench.load import Scenario, body, preflight, run_wrk
from bench.procs import Supervisor
from bench.targets import Target, start_abc, start_mock

KINDS = ("chat", "responses", "messages")


def _preflight(target: Target, kind: str) -> str | None:
    """None when one call of this kind gets a real answer (chat: the harness's own check)."""
    if kind == "chat":
        return preflight(target, kind)
    headers = {"Content-Type": "application/json", "Authorization": target.authorization or ""}
    status, raw = call("POST", target.base_url + Scenario(kind, 1).path, body=body(kind), headers=headers)
    wanted = b'"output_text"' if kind == "responses" else b'"type":"text"'
    return None if status == 200 and wanted in raw else f"HTTP {status}: {raw[:300]!r}"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dialects", description=__doc__)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--load-cpus", default="0")
    p.add_argument("--gateway-cpus", default="1")
    opts = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="abc-bench-dialects-"))
    rows = []
    with Supervisor(workdir).running() as sup:
        mock, mock_port = start_mock(sup, cpus=opts.load_cpus, delay_ms=0)
        target = start_abc(sup, name="abc", mock=mock, mock_port=mock_port, workers=1,
                           gateway_cpus=opts.gateway_cpus, redis_cpus=opts.gateway_cpus, workdir=workdir)
        for kind in KINDS:
            problem = _preflight(target, kind)
            if problem:
                raise SystemExit(f"{kind}: preflight failed: {problem}")
            scenario = Scenario(kind, opts.connections)
            run_wrk(target, scenario, duration_s=2, load_cpus=opts.load_cpus)  # warm-up
            r = run_wrk(target, scenario, duration_s=opts.duration, load_cpus=opts.load_cpus)
            if r["status"] != "ok":
                raise SystemExit(f"{kind}: {r}")
            rows.append((scenario.label, r))
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n| route (c{opts.connections}, {opts.duration} s) | req/s | p50 ms | p99 ms | gateway CPU ms/req | redis CPU ms/req |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        cpu, lat = r["cpu_ms_per_req"], r["latency_ms"]
        print(f"| {label} | {r['rps']:.0f} | {lat['p50']:.3f} | {lat['p99']:.3f} | {cpu['gateway']:.3f} | {cpu['redis']:.3f} |")


if __name__ == "__main__":
    main()
