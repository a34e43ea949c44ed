"""Redis Cluster against one Redis node: throughput with 1 and 3 gateway processes, and the
Redis work per request, on this machine.

    .venv/bin/python -m bench.cluster [--duration 10] [--connections 32] [--tenant-limits]

Starts a single redis-server and a 3-master Redis Cluster (loopback, no persistence, the
test suite's own launcher), then for each (Redis, processes) pair an `abc-gateway serve
--workers N` with the built-in mock provider (no upstream cost), a plan and a session,
and drives `wrk` with the benchmark's chat body. Redis commands and read events (about
one per round trip) are summed over every node from INFO. Writes a markdown table to
bench/results/cluster.md (and prints it). A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import redis_info
from bench.load import WRK_DIR, _wrk_result
from bench.procs import free_port, run_to_end
from tests.redis_proc import RedisClusterProcess, RedisProcess

ROOT = Path(__file__).resolve().parent.parent
PLAN: dict[str, Any] = {
    "name": "bench-cluster",
    "tenant": "bench",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 64}],
    "budget": {"usd": 1_000_000},
}


def _counters(ports: list[int]) -> list[redis_info.RedisCounters]:
    return [redis_info.counters(p) for p in ports]


def _exec_us(ports: list[int]) -> float:
    """Microseconds Redis spent executing commands (INFO commandstats usec, scripts
    included), summed over the nodes: no idle time, no server cron."""
    total = 0.0
    for port in ports:
        for line in redis_info._info(port, ["commandstats"]).splitlines():
            if line.startswith("cmdstat_") and not line.startswith(("cmdstat_info:", "cmdstat_cluster")):
                fields = dict(item.split("=", 1) for item in line.split(":", 1)[1].split(","))
                total += float(fields["usec"])
    return total


def _cpu_s(ports: list[int]) -> float:
    """Redis's own CPU time (user + sys), summed over the nodes: wall-clock free, so it
    holds on a busy machine too."""
    total = 0.0
    for port in ports:
        for line in redis_info._info(port, ["cpu"]).splitlines():
            if line.startswith(("used_cpu_user:", "used_cpu_sys:")):
                total += float(line.split(":", 1)[1])
    return total


def _per_request(before: list[redis_info.RedisCounters], after: list[redis_info.RedisCounters], requests: int) -> dict[str, float]:
    commands = reads = 0
    for b, a in zip(before, after, strict=True):
        commands += sum(calls - b.commands.get(name, 0) for name, calls in a.commands.items() if name not in ("info", "cluster"))
        reads += (a.reads or 0) - (b.reads or 0) - 1  # -1: our INFO
    return {"commands": round(commands / max(requests, 1), 2), "reads": round(reads / max(requests, 1), 2)}


def _serve(tmp: Path, url: str, cluster: bool, workers: int, tenant_limits: bool) -> tuple[subprocess.Popen[bytes], str, str]:
    settings = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())
    settings["redis"] = {"max_connections": 256, "timeout_ms": 5000}
    config = tmp / f"gateway-{workers}-{int(cluster)}.yaml"
    config.write_text(yaml.safe_dump(settings))
    port, admin = free_port(), secrets.token_hex(16)
    env = {**os.environ, "ABC_REDIS_URL": url, "ABC_ADMIN_TOKEN": admin, "ABC_SIGNING_KEY": secrets.token_hex(32),
           "ABC_REDIS_CLUSTER": "1" if cluster else "0"}
    argv = [str(Path(sys.executable).with_name("abc-gateway")), "serve", "--config", str(config), "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.1)
    headers = {"Authorization": f"Bearer {admin}"}
    plan = {**PLAN, "limits": {"tenant_usd_per_day": 1_000_000}} if tenant_limits else PLAN
    asm = httpx.post(base + "/admin/v1/plans/compile", json=plan, headers=headers).json()["assembly_id"]
    token = httpx.post(base + "/admin/v1/sessions", json={"assembly_id": asm}, headers=headers).json()["token"]
    return process, base, token


def _wrk(base: str, token: str, duration: int, connections: int) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(WRK_DIR / "chat.lua"), base + "/v1/chat/completions"]
    finished = run_to_end(argv, cpus=None, timeout_s=duration + 60, env={**os.environ, "BENCH_AUTHORIZATION": f"Bearer {token}"})
    result = _wrk_result(finished.output)
    if result is None:
        raise RuntimeError("wrk printed no result: " + finished.output[-300:])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", default="1,3")
    parser.add_argument("--tenant-limits", action="store_true", help="plans with a tenant daily cap (the two-slot protocol)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster.md")
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        single = RedisProcess(tmp / "single").start()
        cluster = RedisClusterProcess(tmp / "cluster", masters=3).start()
        try:
            for kind, url, ports in (("single node", single.url, [single.port]), ("cluster, 3 masters", cluster.url, cluster.masters())):
                for workers in (int(w) for w in opts.workers.split(",")):
                    process, base, token = _serve(tmp, url, kind != "single node", workers, opts.tenant_limits)
                    try:
                        _wrk(base, token, 5, opts.connections)  # warm-up: every worker's slot map and scripts
                        before, cpu_before, exec_before = _counters(ports), _cpu_s(ports), _exec_us(ports)
                        result = _wrk(base, token, opts.duration, opts.connections)
                        after, cpu_after, exec_after = _counters(ports), _cpu_s(ports), _exec_us(ports)
                    finally:
                        process.terminate()
                        process.wait(timeout=30)
                    requests = int(result["requests"])
                    ok = int(result["statuses"].get("200", 0))
                    per = _per_request(before, after, requests)
                    cpu_us = round((cpu_after - cpu_before) * 1e6 / max(requests, 1), 1)
                    exec_us = round((exec_after - exec_before) / max(requests, 1), 1)
                    rows.append((kind, workers, round(requests / (result["duration_us"] / 1e6)), result["latency_us"]["p50"] / 1000,
                                 result["latency_us"]["p99"] / 1000, per["commands"], per["reads"], exec_us, cpu_us, requests - ok))
                    print(rows[-1], flush=True)
        finally:
            cluster.stop()
            single.stop()
    lines = [
        f"Redis Cluster vs one node: {opts.duration} s of wrk at {opts.connections} connections, chat completions on the built-in mock"
        + (", tenant daily cap on" if opts.tenant_limits else "") + f" ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs).",
        "",
        "| Redis | gateway processes | req/s | p50 ms | p99 ms | Redis commands/req | Redis reads/req | Redis exec µs/req | Redis CPU µs/req | non-200 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {k} | {w} | {rps} | {p50:.2f} | {p99:.2f} | {c} | {r} | {ex} | {cpu} | {bad} |" for k, w, rps, p50, p99, c, r, ex, cpu, bad in rows],
        "",
        f"Load average when done: {os.getloadavg()[0]:.1f}. req/s, latency and Redis CPU (which includes idle work such as"
        " the server cron, large per request at low rates) are only meaningful on an otherwise idle machine; commands, reads"
        " and exec µs (time inside commands and scripts, INFO commandstats) per request much less so.",
    ]
    text = "\n".join(lines) + "\n"
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
