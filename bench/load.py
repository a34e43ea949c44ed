"""Running one scenario against one target and measuring everything around it.

A scenario is a request kind at a concurrency. Around each wrk run we read every
measured process's CPU, the machine's per-CPU busy time and Redis's counters, so a
figure can be divided by the requests that were actually served.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import redis_info
from bench.httpcall import call
from bench.machine import busy_pct, cpu_times
from bench.procs import run_to_end
from bench.targets import Target, child_env, tool_env

BENCH_DIR = Path(__file__).resolve().parent
WRK_DIR = BENCH_DIR / "wrk"
KINDS = ("chat", "stream", "embeddings")
KIND_LABELS = {"chat": "chat", "stream": "chat stream", "embeddings": "embeddings",
               "responses": "Responses API", "messages": "Anthropic Messages"}
# Kinds only the gateway serves (the mock upstream speaks chat): see bench/dialects.py.
_PATHS = {"embeddings": "/embeddings", "responses": "/responses", "messages": "/messages"}
WRK_TIMEOUT = "10s"  # slow answers count in the latency, not as timeouts


@dataclass(frozen=True)
class Scenario:
    kind: str  # one of KINDS
    connections: int

    @property
    def key(self) -> str:
        return f"{self.kind}-c{self.connections}"

    @property
    def path(self) -> str:
        return _PATHS.get(self.kind, "/chat/completions")

    @property
    def label(self) -> str:
        return f"{KIND_LABELS[self.kind]} c{self.connections}"


def body(kind: str) -> bytes:
    """The same request body wrk sends (bench/wrk/bodies)."""
    return (WRK_DIR / "bodies" / f"{kind}.json").read_bytes()


def _headers(target: Target) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if target.authorization:
        headers["Authorization"] = target.authorization
    return headers


def preflight(target: Target, kind: str) -> str | None:
    """None when one request of this kind gets a real answer, else why not.

    A fast 4xx would look like great throughput, so nothing is measured without this.
    """
    try:
        status, raw = call(
            "POST",
            target.base_url + Scenario(kind, 1).path,
            body=body(kind),
            headers=_headers(target),
        )
    except OSError as exc:
        return f"request failed: {exc}"
    snippet = raw[:300].decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {snippet}"
    if kind == "stream":
        if b"data: [DONE]" not in raw or b'"content":"word0' not in raw.replace(b" ", b""):
            return f"stream without content or [DONE]: {snippet}"
        if b'"error":' in raw:
            return f"stream carries an error: {snippet}"
        return None
    try:
        answer = orjson.loads(raw)
        if kind == "chat":
            ok = bool(answer["choices"][0]["message"]["content"])
        else:
            ok = len(answer["data"][0]["embedding"]) > 0
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        ok = False
    return None if ok else f"unexpected answer: {snippet}"


def _cpu_delta_ms(before: dict[int, float], after: dict[int, float]) -> float:
    # A process born during the run counts from zero; one that died is lost (rare).
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def _wrk_result(output: str) -> dict[str, Any] | None:
    match = re.search(r"^BENCH_RESULT (\{.*\})$", output, re.MULTILINE)
    if not match:
        return None
    parsed: dict[str, Any] = orjson.loads(match.group(1))
    return parsed


def run_wrk(
    target: Target, scenario: Scenario, *, duration_s: int, load_cpus: str | None
) -> dict[str, Any]:
    """Run wrk once and return the scenario's figures (see README: columns).

    A run that produced no figures has status "failed" and a reason instead.
    """
    argv = ["wrk", "-t1", f"-c{scenario.connections}", f"-d{duration_s}s"]
    argv += ["--timeout", WRK_TIMEOUT, "-s", str(WRK_DIR / f"{scenario.kind}.lua")]
    argv += [target.base_url + scenario.path]
    env = {**child_env(), "BENCH_AUTHORIZATION": target.authorization or ""}

    cpu_before = {role: child.cpu_ms_by_pid() for role, child in target.roles.items()}
    redis_before = redis_info.counters(target.redis_port) if target.redis_port else None
    machine_before = cpu_times()
    try:
        finished = run_to_end(argv, cpus=load_cpus, timeout_s=duration_s + 60, env=env)
    except TimeoutError as exc:
        return {"status": "failed", "reason": str(exc)}
    machine_after = cpu_times()
    redis_after = redis_info.counters(target.redis_port) if target.redis_port else None
    cpu_after = {role: child.cpu_ms_by_pid() for role, child in target.roles.items()}

    wrk = _wrk_result(finished.output)
    if wrk is None:
        return {"status": "failed", "reason": f"wrk printed no result: {finished.output[-500:]}"}
    requests = int(wrk["requests"])
    seconds = wrk["duration_us"] / 1e6
    per_req = max(requests, 1)
    cpu_ms = {role: _cpu_delta_ms(cpu_before[role], cpu_after[role]) for role in cpu_before}
    cpu_ms["wrk"] = finished.cpu_ms
    machine_busy_ms = sum(machine_after.busy_ms) - sum(machine_before.busy_ms)
    statuses = {str(k): int(v) for k, v in wrk["statuses"].items()}
    non_2xx = sum(n for code, n in statuses.items() if not code.startswith("2"))
    socket_errors = {k: v for k, v in wrk["errors"].items() if k != "status" and v}
    latency = {k: round(v / 1000.0, 3) for k, v in wrk["latency_us"].items()}
    bad = non_2xx or wrk["body_errors"] or socket_errors or requests == 0
    return {
        "status": "errors" if bad else "ok",
        "requests": requests,
        "duration_s": round(seconds, 3),
        "rps": round(requests / seconds, 1) if seconds else 0.0,
        "latency_ms": latency,
        "statuses": statuses,
        "non_2xx": non_2xx,
        "body_errors": wrk["body_errors"],
        "socket_errors": socket_errors,
        "cpu_ms_per_req": {role: round(ms / per_req, 4) for role, ms in cpu_ms.items()},
        # Share of one core over the run: near 100 means that process was the bottleneck.
        "cpu_pct": {role: round(ms / (seconds * 10.0), 1) for role, ms in cpu_ms.items()},
        "machine": {
            "busy_pct_per_cpu": busy_pct(machine_before, machine_after),
            # Busy time of the machine not spent in any measured process: other programs,
            # and kernel softirq work of the loopback network.
            "unattributed_ms_per_req": round((machine_busy_ms - sum(cpu_ms.values())) / per_req, 4),
            "unattributed_pct": round(
                (machine_busy_ms - sum(cpu_ms.values())) / (seconds * 10.0), 1
            ),
        },
        "redis": (
            redis_info.per_request(redis_before, redis_after, requests)
            if redis_before and redis_after
            else None
        ),
    }


def run_ttft(target: Target, *, n: int, load_cpus: str | None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.ttft", "--url", target.base_url + "/chat/completions"]
    argv += ["--n", str(n)]
    env = {**tool_env(), "BENCH_AUTHORIZATION": target.authorization or ""}
    finished = run_to_end(argv, cpus=load_cpus, timeout_s=600, env=env)
    lines = [line for line in finished.output.splitlines() if line.startswith("{")]
    if finished.returncode != 0 or not lines:
        return {"status": "failed", "reason": finished.output[-1500:]}
    result: dict[str, Any] = orjson.loads(lines[-1])
    result["status"] = "ok" if result["ok"] == n else "errors"
    for name in ("ttft", "total"):
        micros = result.pop(f"{name}_us")
        result[f"{name}_ms"] = (
            {k: round(v / 1000.0, 3) for k, v in micros.items()} if micros else None
        )
    return result
