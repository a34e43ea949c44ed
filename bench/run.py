"""One benchmark run: start each target in turn, run every scenario on it, collect the results.

Targets run one after the other, never at the same time, so an idle gateway cannot
take CPU from the one being measured. The mock upstream is shared by all of them.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.checks import Results, scenario_result
from bench.litellm_target import start_litellm
from bench.load import KINDS, Scenario, preflight, run_ttft, run_wrk
from bench.machine import machine_info
from bench.procs import Child, Supervisor
from bench.profiling import (
    cprofile_prefix,
    py_spy_argv,
    py_spy_executable,
    summarize_collapsed,
    summarize_pstats,
)
from bench.report import MIB
from bench.targets import Target, TargetFailed, direct_target, start_abc, start_mock


@dataclass(frozen=True)
class Options:
    targets: tuple[str, ...]
    duration: int
    connections: int
    warmup_s: int
    skip_leak: bool
    leak_requests: tuple[int, int]
    workers: tuple[int, ...]
    ttft_requests: int
    mock_delay_ms: float
    load_cpus: str | None
    gateway_cpus: str | None
    command: str
    profile: str | None  # None, "py-spy" or "cprofile"
    profile_dir: Path
    tree: Path | None = None  # ABC's code from this source tree (with this venv's dependencies)


@dataclass
class Run:
    opts: Options
    sup: Supervisor
    workdir: Path
    mock: Child
    mock_port: int
    results: Results

    @property
    def scenarios(self) -> list[Scenario]:
        return [Scenario(kind, c) for kind in KINDS for c in (1, self.opts.connections)]


def run(opts: Options) -> Results:
    results: Results = {
        "meta": {
            "command": opts.command,
            "machine": machine_info(),
            "options": {
                "targets": list(opts.targets),
                "duration": opts.duration,
                "connections": opts.connections,
                "warmup_s": opts.warmup_s,
                "leak_requests": list(opts.leak_requests) if not opts.skip_leak else None,
                "workers": list(opts.workers),
                "ttft_requests": opts.ttft_requests,
                "mock_delay_ms": opts.mock_delay_ms,
            },
            "pinning": _pinning(opts),
            "notes": [],
        },
        "targets": {},
        "scenarios": [],
        "ttft": {},
        "leak": None,
        "scale_out": [],
        "profile": None,
    }
    workdir = Path(tempfile.mkdtemp(prefix="abc-bench-"))
    keep_logs = False
    with Supervisor(workdir).running() as sup:
        print(f"logs and temporary files: {workdir}")
        mock, mock_port = start_mock(sup, cpus=opts.load_cpus, delay_ms=opts.mock_delay_ms)
        bench = Run(opts, sup, workdir, mock, mock_port, results)
        results["scenarios"] = [
            {
                "key": s.key,
                "kind": s.kind,
                "connections": s.connections,
                "label": s.label,
                "results": {},
            }
            for s in bench.scenarios
        ]
        for name in opts.targets:
            keep_logs |= not _run_target(bench, name)
        if "abc" in opts.targets:
            keep_logs |= not _scale_out(bench)
    if keep_logs:
        print(f"logs kept in {workdir}")
        results["meta"]["notes"].append(f"process logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _pinning(opts: Options) -> str:
    if not opts.load_cpus:
        return "none (fewer than 2 CPUs)"
    return (
        f"mock, wrk and the TTFT client on CPU {opts.load_cpus}; each gateway "
        f"(and ABC's redis-server) on CPU {opts.gateway_cpus}"
    )


def _start(bench: Run, name: str) -> Target:
    opts = bench.opts
    if name == "direct":
        target = direct_target(bench.mock, bench.mock_port)
        target.gateway_cpus = opts.load_cpus  # the mock is the whole target here
        return target
    if name == "abc":
        prefix = _tree_prefix(opts)
        if opts.profile == "cprofile":
            prefix = cprofile_prefix(_cprofile_path(opts))
        target = start_abc(
            bench.sup,
            name="abc",
            mock=bench.mock,
            mock_port=bench.mock_port,
            workers=1,
            gateway_cpus=opts.gateway_cpus,
            redis_cpus=opts.gateway_cpus,
            workdir=bench.workdir,
            command_prefix=prefix,
        )
        if opts.profile == "cprofile":
            target.notes.append("run under cProfile: its figures are for the profile only")
        elif opts.tree is not None:
            target.notes.append(f"the gateway's code from {opts.tree}")
        return target
    if name == "litellm":
        return start_litellm(
            bench.sup,
            mock=bench.mock,
            mock_port=bench.mock_port,
            cpus=opts.gateway_cpus,
            workdir=bench.workdir,
        )
    raise ValueError(f"unknown target {name!r}")


def _run_target(bench: Run, name: str) -> bool:
    """Measure one target; False when something failed (the results say what)."""
    print(f"\n== {name}: starting", flush=True)
    try:
        target = _start(bench, name)
    except TargetFailed as exc:
        print(f"!! {name} failed to start:\n{exc}", flush=True)
        bench.results["targets"][name] = {"label": name, "status": "failed", "error": str(exc)}
        for scenario in bench.results["scenarios"]:
            scenario["results"][name] = {"status": "failed", "reason": "target failed to start"}
        bench.results["ttft"][name] = {"status": "failed", "reason": "target failed to start"}
        return False
    try:
        return _measure_target(bench, target)
    finally:
        for child in target.own:
            bench.sup.stop(child)
        if name == "abc" and bench.opts.profile == "cprofile":
            bench.results["profile"] = _cprofile_summary(bench.opts)


def _measure_target(bench: Run, target: Target) -> bool:
    opts, results = bench.opts, bench.results
    info: dict[str, Any] = {
        "label": target.label,
        "status": "ok",
        "startup_s": None if target.startup_s is None else round(target.startup_s, 3),
        "idle_rss_mib": _mib(target.idle_rss_bytes),
        "rss_after_load_mib": None,
        "gateway_cpus": target.gateway_cpus,
        "unsupported": dict(target.unsupported),
        "notes": target.notes,
        "pid": target.gateway.pid if target.gateway else bench.mock.pid,
    }
    results["targets"][target.name] = info
    if target.startup_s is not None:
        print(
            f"   ready in {target.startup_s:.2f}s, idle RSS {info['idle_rss_mib']} MiB "
            f"(pid {info['pid']})",
            flush=True,
        )
    failed: dict[str, str] = {}
    for kind in KINDS:
        if kind not in target.unsupported and (reason := preflight(target, kind)):
            failed[kind] = reason
            print(f"!! {target.name} {kind}: preflight failed: {reason}", flush=True)
    if target.gateway:
        # Lazy imports and caches fill on the first requests; idle RSS alone would flatter.
        info["rss_after_first_requests_mib"] = _mib(target.gateway.rss_bytes())
    for kind in KINDS:
        if kind not in target.unsupported and kind not in failed:
            run_wrk(
                target,
                Scenario(kind, opts.connections),
                duration_s=opts.warmup_s,
                load_cpus=opts.load_cpus,
            )
    for scenario, entry in zip(bench.scenarios, results["scenarios"], strict=True):
        entry["results"][target.name] = _scenario(bench, target, scenario, failed)
    if "stream" in failed:
        results["ttft"][target.name] = {"status": "failed", "reason": failed["stream"]}
    else:
        ttft = run_ttft(target, n=opts.ttft_requests, load_cpus=opts.load_cpus)
        results["ttft"][target.name] = ttft
        p50 = (ttft.get("ttft_ms") or {}).get("p50")
        print(
            f"   {target.name:8} {'ttft c1':18} p50 {p50} ms  status {ttft['status']}", flush=True
        )
    if target.gateway:
        info["rss_after_load_mib"] = _mib(target.gateway.rss_bytes())
    ok = not failed
    if target.name == "abc" and not opts.skip_leak:
        loaded = scenario_result(results, f"chat-c{opts.connections}", "abc") or {}
        results["leak"] = _leak_check(bench, target, rps_hint=loaded.get("rps") or 1000.0)
        ok &= results["leak"]["status"] == "ok"
    return ok


def _scenario(bench: Run, target: Target, scenario: Scenario, failed: dict[str, str]) -> Any:
    if scenario.kind in target.unsupported:
        return {"status": "n/a", "reason": target.unsupported[scenario.kind]}
    if scenario.kind in failed:
        return {"status": "failed", "reason": f"preflight: {failed[scenario.kind]}"}
    profiled = (
        bench.opts.profile == "py-spy"
        and target.name == "abc"
        and scenario == Scenario("chat", bench.opts.connections)
    )
    spy = _start_py_spy(bench, target) if profiled else None
    result = run_wrk(
        target, scenario, duration_s=bench.opts.duration, load_cpus=bench.opts.load_cpus
    )
    _print_line(target.name, scenario.label, result)
    if spy is not None:
        bench.results["profile"] = _finish_py_spy(bench, spy)
    return result


def _start_py_spy(bench: Run, target: Target) -> Child | None:
    exe = py_spy_executable()
    if exe is None or target.gateway is None:
        bench.results["profile"] = {
            "tool": "py-spy",
            "error": "py-spy not found on PATH (pip install py-spy)",
        }
        return None
    out = bench.opts.profile_dir / "profile-abc.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = py_spy_argv(exe, pid=target.gateway.pid, seconds=bench.opts.duration, out=out)
    # On the load CPU, so sampling does not take time from the gateway's own core.
    return bench.sup.start("py-spy", argv, cpus=bench.opts.load_cpus)


def _finish_py_spy(bench: Run, spy: Child) -> dict[str, Any]:
    try:
        spy.popen.wait(timeout=30)
    finally:
        bench.sup.stop(spy)
    out = bench.opts.profile_dir / "profile-abc.txt"
    if spy.popen.returncode != 0 or not out.exists():
        return {"tool": "py-spy", "error": spy.tail(10)}
    print(f"   py-spy profile: {out}", flush=True)
    return summarize_collapsed(out)


def _tree_prefix(opts: Options) -> list[str] | None:
    """`python -m gateway` from --tree. -P: else `-m` would put the current directory, maybe
    another tree, first on sys.path."""
    if opts.tree is None:
        return None
    return ["env", f"PYTHONPATH={opts.tree.resolve()}", sys.executable, "-P", "-m", "gateway"]


def _cprofile_path(opts: Options) -> Path:
    opts.profile_dir.mkdir(parents=True, exist_ok=True)
    return (opts.profile_dir / "profile-abc.prof").resolve()


def _cprofile_summary(opts: Options) -> dict[str, Any]:
    path = _cprofile_path(opts)
    if not path.exists():
        return {
            "tool": "cProfile",
            "error": f"{path} was not written (did the gateway exit cleanly?)",
        }
    print(f"   cProfile stats: {path}", flush=True)
    return summarize_pstats(path)


def _print_line(name: str, label: str, r: dict[str, Any]) -> None:
    if r["status"] == "failed":
        print(f"!! {name} {label}: {r['reason']}", flush=True)
        return
    lat, cpu = r["latency_ms"], r["cpu_ms_per_req"]
    gateway = f"gateway {cpu['gateway']:.3f} ms/req" if "gateway" in cpu else ""
    flag = (
        ""
        if r["status"] == "ok"
        else (
            f"  !! {r['non_2xx']} non-2xx {r['statuses']} {r['body_errors']} body errors "
            f"{r['socket_errors']}"
        )
    )
    print(
        f"   {name:8} {label:18} p50 {lat['p50']:8.3f} ms  p99 {lat['p99']:8.3f} ms  "
        f"{r['rps']:9.1f} req/s  {gateway}{flag}",
        flush=True,
    )


def _leak_check(bench: Run, target: Target, *, rps_hint: float) -> dict[str, Any]:
    """Gateway RSS after the first and the second milestone of chat requests, in wrk chunks."""
    assert target.gateway is not None
    scenario = Scenario("chat", bench.opts.connections)
    print(
        f"   leak check: {bench.opts.leak_requests[0]:,} then "
        f"{bench.opts.leak_requests[1]:,} requests",
        flush=True,
    )
    total, errors, rps = 0, 0, max(rps_hint, 1.0)
    points: list[dict[str, Any]] = []
    for milestone in bench.opts.leak_requests:
        while total < milestone:
            # wrk takes a duration, not a count: size each chunk from the last rate seen.
            seconds = min(30, max(1, math.ceil((milestone - total) / rps)))
            r = run_wrk(target, scenario, duration_s=seconds, load_cpus=bench.opts.load_cpus)
            if r["status"] == "failed" or r["requests"] == 0:
                reason = r.get("reason") or "a leak-check chunk served no request"
                return {"status": "failed", "reason": reason, "points": points}
            total += r["requests"]
            errors += r["non_2xx"] + r["body_errors"] + sum(r["socket_errors"].values())
            rps = max(r["rps"], 1.0)
        points.append({"requests": total, "rss_mib": _mib(target.gateway.rss_bytes())})
        print(f"   after {total:,} requests: RSS {points[-1]['rss_mib']} MiB", flush=True)
    ratio = round(points[-1]["rss_mib"] / points[0]["rss_mib"], 3) if points[0]["rss_mib"] else None
    return {
        "status": "ok" if errors == 0 else "errors",
        "errors": errors,
        "points": points,
        "ratio": ratio,
    }


def _scale_out(bench: Run) -> bool:
    opts = bench.opts
    loaded = Scenario("chat", opts.connections)
    main = next(s for s in bench.results["scenarios"] if s["key"] == loaded.key)
    ok = True
    for workers in opts.workers:
        if workers == 1:
            entry = _scale_entry_from_main(bench, main["results"].get("abc"))
        else:
            entry = _scale_run(bench, workers, loaded)
        bench.results["scale_out"].append(entry)
        ok &= entry["status"] == "ok"
    return ok


def _scale_entry_from_main(bench: Run, result: dict[str, Any] | None) -> dict[str, Any]:
    if not result or result.get("status") not in ("ok", "errors"):
        return {"workers": 1, "status": "failed", "reason": "the main ABC run has no result"}
    info = bench.results["targets"]["abc"]
    return _scale_entry(
        1,
        info.get("gateway_cpus"),
        result,
        info.get("rss_after_load_mib"),
        1,
        source="the main ABC run",
    )


def _scale_run(bench: Run, workers: int, scenario: Scenario) -> dict[str, Any]:
    opts = bench.opts
    print(f"\n== abc with {workers} workers (gateway not pinned)", flush=True)
    try:
        target = start_abc(
            bench.sup,
            name=f"abc-w{workers}",
            mock=bench.mock,
            mock_port=bench.mock_port,
            workers=workers,
            gateway_cpus=None,
            redis_cpus=opts.gateway_cpus,
            workdir=bench.workdir,
            command_prefix=_tree_prefix(opts),
        )
    except TargetFailed as exc:
        print(f"!! abc with {workers} workers failed to start:\n{exc}", flush=True)
        return {"workers": workers, "status": "failed", "reason": str(exc).splitlines()[0]}
    try:
        assert target.gateway is not None
        if reason := preflight(target, "chat"):
            return {"workers": workers, "status": "failed", "reason": f"preflight: {reason}"}
        run_wrk(target, scenario, duration_s=opts.warmup_s, load_cpus=opts.load_cpus)
        result = run_wrk(target, scenario, duration_s=opts.duration, load_cpus=opts.load_cpus)
        _print_line(target.name, scenario.label, result)
        if result["status"] == "failed":
            return {"workers": workers, "status": "failed", "reason": result["reason"]}
        processes = len(target.gateway.cpu_ms_by_pid())
        return _scale_entry(
            workers,
            None,
            result,
            _mib(target.gateway.rss_bytes()),
            processes,
            source=f"a separate gateway, start-up {target.startup_s:.2f}s",
        )
    finally:
        for child in target.own:
            bench.sup.stop(child)


def _scale_entry(
    workers: int,
    pinned: str | None,
    r: dict[str, Any],
    rss_mib: float | None,
    processes: int,
    *,
    source: str,
) -> dict[str, Any]:
    return {
        "workers": workers,
        "status": r["status"],
        "pinned": pinned,
        "rps": r["rps"],
        "p50_ms": r["latency_ms"]["p50"],
        "p99_ms": r["latency_ms"]["p99"],
        "cpu_ms_per_req": r["cpu_ms_per_req"].get("gateway"),
        "rss_mib": rss_mib,
        "gateway_processes": processes,
        "errors": r["non_2xx"] + r["body_errors"] + sum(r["socket_errors"].values()),
        "source": source,
    }


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)
