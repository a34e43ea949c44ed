"""Optional profiles of the ABC gateway (--profile py-spy | cprofile), summarised for the report.

py-spy samples the running gateway from outside during the loaded chat scenario and
barely slows it; cProfile runs the whole gateway under the profiler, which roughly
doubles its CPU, so the figures of a cProfile run are for reading the profile only.
"""

from __future__ import annotations

import pstats
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

TOP = 20


def py_spy_executable() -> str | None:
    return shutil.which("py-spy") or _in_venv("py-spy")


def _in_venv(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def py_spy_argv(exe: str, *, pid: int, seconds: int, out: Path) -> list[str]:
    # --nonblocking: never pause the gateway to read its stack, so the figures stay honest;
    # --subprocesses: the workers of a pre-forked gateway too.
    return [
        exe,
        "record",
        "--format",
        "raw",
        "--nonblocking",
        "--subprocesses",
        "--rate",
        "250",
        "--duration",
        str(seconds),
        "--pid",
        str(pid),
        "--output",
        str(out),
    ]


def cprofile_prefix(out: Path) -> list[str]:
    """Run `python -m gateway` under cProfile; it writes `out` when the gateway exits."""
    return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "gateway"]


def _function(frame: str) -> str:
    # "handler (gateway/http/openai_routes.py:26)" -> "handler (gateway/http/openai_routes.py)"
    name, _, where = frame.rpartition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if name else frame


def _is_project(function: str) -> bool:
    # The gateway's own code: what an optimisation of the spine would change.
    return "(gateway/" in function or "(plugins/" in function or "/gateway/" in function


def summarize_collapsed(path: Path) -> dict[str, Any]:
    """Self share per function, inclusive share per gateway function, from py-spy raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # --subprocesses puts a "process PID:command" frame at the root of every stack.
        frames = [_function(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for function in set(frames):
            if _is_project(function):
                inclusive[function] += count

    def top(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": f, "pct": round(100.0 * n / samples, 1)}
            for f, n in counter.most_common(TOP)
        ]

    return {
        "tool": "py-spy",
        "file": str(path),
        "samples": samples,
        "top_self": top(own) if samples else [],
        "top_project": top(inclusive) if samples else [],
    }


def summarize_pstats(path: Path) -> dict[str, Any]:
    stats = pstats.Stats(str(path))
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values()) or 1.0

    def top(index: int, only_project: bool) -> list[dict[str, Any]]:
        rows = [
            ((file, line, fn), entry)
            for (file, line, fn), entry in table.items()
            if not only_project or _is_project(file)
        ]
        ranked = sorted(rows, key=lambda kv: -kv[1][index])[:TOP]
        return [
            {
                "function": f"{fn} ({_short_path(file)}:{line})",
                "pct": round(100.0 * entry[index] / total, 1),
                "calls": entry[1],
            }
            for (file, line, fn), entry in ranked
        ]

    # Shares of the summed self time; inclusive shares can pass 100% through recursion.
    return {
        "tool": "cProfile",
        "file": str(path),
        "top_self": top(2, False),
        "top_project": top(3, True),
    }


def _short_path(file: str) -> str:
    for marker in ("/site-packages/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return Path(file).name
