"""What the benchmark ran on, and how busy each CPU was while it ran.

Per-CPU busy time from /proc/stat shows load from outside the benchmark, which
per-process CPU alone would hide.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import MS_PER_TICK


@dataclass(frozen=True)
class CpuTimes:
    """Busy and total milliseconds per CPU since boot."""

    busy_ms: tuple[float, ...]
    total_ms: tuple[float, ...]


def cpu_times() -> CpuTimes:
    busy: list[float] = []
    total: list[float] = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        ticks = [int(v) for v in values[:8]]
        idle = ticks[3] + ticks[4]
        busy.append((sum(ticks) - idle) * MS_PER_TICK)
        total.append(sum(ticks) * MS_PER_TICK)
    return CpuTimes(busy_ms=tuple(busy), total_ms=tuple(total))


def busy_pct(before: CpuTimes, after: CpuTimes) -> list[float]:
    result = []
    for b0, b1, t0, t1 in zip(
        before.busy_ms, after.busy_ms, before.total_ms, after.total_ms, strict=True
    ):
        span = t1 - t0
        result.append(round(100.0 * (b1 - b0) / span, 1) if span > 0 else 0.0)
    return result


def background_busy_pct(sample_s: float = 1.0) -> list[float]:
    """How busy each CPU is before the benchmark starts anything."""
    before = cpu_times()
    time.sleep(sample_s)
    return busy_pct(before, cpu_times())


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unavailable"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "wrk": _first_line(["wrk", "--version"]).split(" Copyright")[0],
        "redis_server": _first_line(["redis-server", "--version"]),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "background_busy_pct": background_busy_pct(),
    }
