"""tools/call through the gateway against the same call made directly, on loopback.

Starts redis-server, an MCP server (bench/mcp_upstream.py) and `abc-gateway serve` as
child processes, compiles a plan granting the server's tool, opens a session, then makes
sequential calls with the SDK's client: in alternating blocks, directly and through /mcp.
Reports the latency of each path (p50, p99), the p50 overhead, and the gateway process's
CPU time per call (utime + stime from /proc, over the gateway's blocks only).

Run: .venv/bin/python -m bench.mcp_tools [--calls 2000] [--ttl 1.0] [--profile stacks.txt] [--tree DIR] [--json-upstream] [--floor]
     .venv/bin/python -m bench.mcp_tools --instructions [--calls 200] [--tree DIR]
(--profile: py-spy samples the gateway during the whole measurement; the top functions
are printed, the raw stacks kept in the file. --tree: the gateway's code from another
source tree, e.g. a checkout from before a change, with this venv's dependencies; given
twice, both trees' gateways run (each with its Redis and MCP server) and are measured in
turn, block by block, so a busy machine weighs on both alike.
--json-upstream: the MCP server answers with JSON bodies instead of SSE streams; the
SDK's client then keeps its connection to it, where an SSE answer costs the direct path
a new TCP connection per call.
--floor: bench/mcp_floor.py (the same I/O as a tools/call, none of the governance)
is measured in turn with the gateway, on its own Redis: what is left of the gateway's
figures above the floor's is what governing costs.
--instructions: no timing; the gateway runs under callgrind and the user-space
instructions per tools/call and per chat completion are printed: a count that stays
within ~1% on a busy machine, where CPU time moves by 30%.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.procs import cpu_ms, free_port, sys_cpu_ms
from bench.profiling import py_spy_argv, py_spy_executable, summarize_collapsed
from bench.targets import REPO_ROOT, gateway_executable, tool_env

BLOCK = 50  # calls per block; the paths take turns block by block


@contextmanager
def child(argv: list[str], env: dict[str, str], ready_url: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if ready_url is not None:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(ready_url, timeout=1)
                    break
                except httpx.HTTPError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{argv[0]} did not start") from None
                    time.sleep(0.1)
        yield process
    finally:
        process.kill()
        process.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_calls(client: Client, name: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        result = await client.call_tool(name, {"text": f"hello {i}"})
        out.append(time.perf_counter() - started)
        assert not result.is_error
    return out


async def model_reference(base: str, token: str, calls: int, gateway_pid: int) -> dict[str, Any]:
    """A chat completion to the built-in mock through the same gateway: the model path's cost
    on this machine now, to read the tool figures against (load inflates both)."""
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with httpx2.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        for _ in range(50):
            (await http.post("/v1/chat/completions", json=body)).raise_for_status()
        latencies = []
        before, before_sys = cpu_ms(gateway_pid) or 0.0, sys_cpu_ms(gateway_pid) or 0.0
        for _ in range(calls):
            started = time.perf_counter()
            (await http.post("/v1/chat/completions", json=body)).raise_for_status()
            latencies.append(time.perf_counter() - started)
        used = (cpu_ms(gateway_pid) or 0.0) - before
        kernel = (sys_cpu_ms(gateway_pid) or 0.0) - before_sys
    return {
        "model_call_p50_ms": percentile(latencies, 0.5) * 1e3,
        "model_call_gateway_cpu_ms": used / calls,
        "model_call_gateway_cpu_ms_kernel": kernel / calls,
    }


@dataclass
class Through:
    """One gateway measured: its /mcp URL, the session's token, its pid; what it took."""

    label: str
    url: str
    token: str | None  # None: no Authorization (the floor)
    pid: int
    tool: str = "bench__echo"
    latencies: list[float] = field(default_factory=list)
    cpu_ms: float = 0.0
    kernel_ms: float = 0.0


async def measure(direct_url: str, gateways: list[Through], calls: int) -> dict[str, Any]:
    """Blocks of calls in turn: direct, then through each gateway (two gateways: two trees
    compared on the same machine, block by block)."""
    direct_s: list[float] = []
    async with AsyncExitStack() as opened:
        direct = await opened.enter_async_context(Client(direct_url, mode="legacy", cache=None))
        clients = []
        for gw in gateways:
            http = httpx2.AsyncClient(headers={} if gw.token is None else {"Authorization": f"Bearer {gw.token}"}, timeout=30)
            clients.append(await opened.enter_async_context(
                Client(streamable_http_client(gw.url, http_client=http), mode="legacy", cache=None),
            ))
        await timed_calls(direct, "echo", 50)  # warm-up: connections, caches, JIT-less Python paths
        for gw, client in zip(gateways, clients, strict=True):
            await timed_calls(client, gw.tool, 50)
        for _ in range(max(1, calls // BLOCK)):
            direct_s += await timed_calls(direct, "echo", BLOCK)
            for gw, client in zip(gateways, clients, strict=True):
                before, before_sys = cpu_ms(gw.pid) or 0.0, sys_cpu_ms(gw.pid) or 0.0
                gw.latencies += await timed_calls(client, gw.tool, BLOCK)
                gw.cpu_ms += (cpu_ms(gw.pid) or 0.0) - before
                gw.kernel_ms += (sys_cpu_ms(gw.pid) or 0.0) - before_sys
    result: dict[str, Any] = {
        "calls": len(direct_s),
        "direct_p50_ms": percentile(direct_s, 0.5) * 1e3,
        "direct_p99_ms": percentile(direct_s, 0.99) * 1e3,
    }
    for gw in gateways:
        through_s, at = gw.latencies, "" if gw.label == "gateway" else f"@{gw.label}"
        result |= {
            f"gateway_p50_ms{at}": percentile(through_s, 0.5) * 1e3,
            f"gateway_p99_ms{at}": percentile(through_s, 0.99) * 1e3,
            f"overhead_p50_ms{at}": (percentile(through_s, 0.5) - percentile(direct_s, 0.5)) * 1e3,
            f"overhead_mean_ms{at}": (statistics.fmean(through_s) - statistics.fmean(direct_s)) * 1e3,
            f"gateway_cpu_ms_per_call{at}": gw.cpu_ms / len(through_s),
            f"gateway_cpu_ms_per_call_kernel{at}": gw.kernel_ms / len(through_s),
            f"ratio_p50_to_direct{at}": percentile(through_s, 0.5) / percentile(direct_s, 0.5),
        }
    floor = next((gw for gw in gateways if gw.label == "floor"), None)
    if floor is not None:
        # What governing costs: the gateway's figures over the floor's, in the same run.
        for gw in gateways:
            if gw is not floor:
                at = "" if gw.label == "gateway" else f"@{gw.label}"
                result[f"ratio_cpu_to_floor{at}"] = gw.cpu_ms / floor.cpu_ms if floor.cpu_ms else float("nan")
                result[f"ratio_p50_to_floor{at}"] = percentile(gw.latencies, 0.5) / percentile(floor.latencies, 0.5)
    return result


@contextmanager
def profiled(out: Path | None, pid: int) -> Iterator[None]:
    exe = py_spy_executable() if out is not None else None
    if out is None or exe is None:
        if out is not None:
            print("py-spy not found on PATH: no profile", file=sys.stderr)
        yield
        return
    spy = subprocess.Popen(py_spy_argv(exe, pid=pid, seconds=3600, out=out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        spy.wait(timeout=30)
    summary = summarize_collapsed(out)
    print(f"py-spy: {summary['samples']} samples in {out}")
    for title, key in (("self", "top_self"), ("inclusive, gateway code", "top_project")):
        print(f"  top {title}:")
        for row in summary[key][:15]:
            print(f"    {row['pct']:5.1f}%  {row['function']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument(
        "--ttl", type=float, help="definitions_ttl_s of the tool server (0: list before every call; "
        "default 1, or 3600 with --instructions, where a second holds only a few calls)",
    )
    parser.add_argument("--profile", type=Path, help="py-spy the gateway while measuring; raw stacks to this file")
    parser.add_argument(
        "--tree", type=Path, action="append",
        help="run the gateway package of this source tree; twice: both trees' gateways, measured in turn",
    )
    parser.add_argument(
        "--instructions", action="store_true",
        help="count the gateway's user-space instructions per tools/call under callgrind instead of timing",
    )
    parser.add_argument("--json-upstream", action="store_true", help="the MCP server answers JSON, not SSE")
    parser.add_argument("--floor", action="store_true", help="also measure bench/mcp_floor.py: the same I/O, no governance")
    args = parser.parse_args()
    ttl = args.ttl if args.ttl is not None else (3600.0 if args.instructions else 1.0)
    if args.instructions:
        if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
            sys.exit("--instructions needs valgrind (apt-get install valgrind)")
        if args.tree and len(args.tree) > 1:
            sys.exit("--instructions takes one --tree: run it once per tree")
        result = count_instructions(args.tree[0] if args.tree else None, args.calls, ttl, args.json_upstream)
    else:
        trees: list[Path | None] = list(args.tree or [None])
        with ExitStack() as running:
            stacks = [running.enter_context(stack(tree, ttl, json_upstream=args.json_upstream)) for tree in trees]
            gateways = [
                Through("gateway" if len(trees) == 1 else f"{i}:{(tree or Path('.')).resolve().name}", base + "/mcp", token, gateway.pid)
                for i, (tree, (_, base, token, gateway)) in enumerate(zip(trees, stacks, strict=True))
            ]
            if args.floor:
                gateways.append(running.enter_context(floor(stacks[0][0])))
            with profiled(args.profile, gateways[0].pid):
                result = asyncio.run(measure(stacks[0][0], gateways, args.calls))
            for gw, (_, base, token, _) in zip(gateways, stacks, strict=False):  # the floor serves no chat
                at = "" if gw.label == "gateway" else f"@{gw.label}"
                reference = asyncio.run(model_reference(base, token, min(args.calls, 500), gw.pid))
                result |= {key + at: value for key, value in reference.items()}
    result["definitions_ttl_s"] = ttl
    result["upstream_answers"] = "json" if args.json_upstream else "sse"
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


@contextmanager
def stack(
    tree: Path | None, ttl: float, prefix: list[str] | None = None, json_upstream: bool = False,
) -> Iterator[tuple[str, str, str, subprocess.Popen[bytes]]]:
    """Redis, the MCP server and the gateway (its argv after `prefix`, e.g. valgrind), a
    compiled plan granting the server's tool and an open session: (MCP server URL, gateway
    base URL, the session's token, the gateway process)."""
    work = Path(tempfile.mkdtemp(prefix="abc-bench-mcp-"))
    redis_port, mcp_port, gw_port = free_port(), free_port(), free_port()
    admin, signing = secrets.token_hex(16), secrets.token_hex(32)
    mcp_url = f"http://127.0.0.1:{mcp_port}/mcp"
    settings = {
        "providers": [{"name": "mock", "kind": "mock"}],
        "models": [{"name": "gpt-4o-mini", "provider": "mock", "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}],
        "tool_servers": [{"name": "bench", "url": mcp_url, "definitions_ttl_s": ttl}],
        "server": {"host": "127.0.0.1", "port": gw_port},
    }
    config = work / "gateway.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = tool_env(ABC_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", ABC_ADMIN_TOKEN=admin, ABC_SIGNING_KEY=signing)
    base = f"http://127.0.0.1:{gw_port}"
    gateway_env = env if tree is None else {**env, "PYTHONPATH": f"{tree.resolve()}{os.pathsep}{env['PYTHONPATH']}"}
    # -P: else `-m` puts the current directory (this tree) first on sys.path, whatever --tree says.
    program = [str(gateway_executable())] if prefix is None else [*prefix, sys.executable, "-P", "-m", "gateway"]
    gateway_argv = [*program, "serve", "--config", str(config)]
    upstream_argv = [sys.executable, "-m", "bench.mcp_upstream", "--port", str(mcp_port), *(["--json"] if json_upstream else [])]
    redis_argv = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no", "--dir", str(work)]
    with child(redis_argv, env), \
            child(upstream_argv, env, f"http://127.0.0.1:{mcp_port}/"), \
            child(gateway_argv, gateway_env, base + "/healthz") as gateway:
        headers = {"Authorization": f"Bearer {admin}"}
        plan = {
            "name": "bench-mcp", "models": [{"name": "gpt-4o-mini", "max_tokens": 16}],
            "mcp": [{"server": "bench", "tools": ["echo"], "price_per_call_usd": 0.000001}],
            "budget": {"usd": 1000},
        }
        compiled = httpx.post(base + "/admin/v1/plans/compile", json=plan, headers=headers, timeout=600).raise_for_status().json()
        opened = httpx.post(base + "/admin/v1/sessions", json={"assembly_id": compiled["assembly_id"]}, headers=headers, timeout=600)
        yield mcp_url, base, opened.raise_for_status().json()["token"], gateway


@contextmanager
def floor(mcp_url: str) -> Iterator[Through]:
    """bench/mcp_floor.py on a Redis of its own, in front of the same MCP server."""
    work = Path(tempfile.mkdtemp(prefix="abc-bench-mcp-floor-"))
    redis_port, port = free_port(), free_port()
    env = tool_env()
    redis_argv = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no", "--dir", str(work)]
    floor_argv = [sys.executable, "-P", "-m", "bench.mcp_floor", "--port", str(port), "--redis-port", str(redis_port), "--upstream", mcp_url]
    with child(redis_argv, env), child(floor_argv, env, f"http://127.0.0.1:{port}/") as process:
        yield Through("floor", f"http://127.0.0.1:{port}/mcp", None, process.pid, tool="echo")


def count_instructions(tree: Path | None, calls: int, ttl: float, json_upstream: bool = False) -> dict[str, Any]:
    """The gateway's instructions per tools/call and per chat completion (the reference),
    each over `calls` sequential calls after a warm-up; callgrind counts only between
    `callgrind_control -i on` and `-i off`, so start-up and the warm-up are left out."""
    work = Path(tempfile.mkdtemp(prefix="abc-bench-mcp-callgrind-"))
    out = work / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    counts: dict[str, Any] = {"calls": calls}

    async def counted(kind: str, run: Callable[[int], Awaitable[None]], pid: int) -> None:
        await run(20)  # warm-up
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
        await run(calls)
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-d", kind, str(pid)], check=True, capture_output=True)

    async def drive(base: str, token: str, pid: int) -> None:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=600)
        async with Client(streamable_http_client(base + "/mcp", http_client=http), mode="legacy", cache=None) as through:
            await counted("tools", lambda n: timed_calls(through, "bench__echo", n), pid)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        async with httpx2.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=600) as chat:

            async def chats(n: int) -> None:
                for _ in range(n):
                    (await chat.post("/v1/chat/completions", json=body)).raise_for_status()

            await counted("chat", chats, pid)

    with stack(tree, ttl, prefix=valgrind, json_upstream=json_upstream) as (_, base, token, gateway):
        asyncio.run(drive(base, token, gateway.pid))  # valgrind execs python: the same pid
    for kind in ("tools", "chat"):
        counts[f"{kind}_call_instructions_M"] = _dumped(work, kind) / calls / 1e6
    return counts


def _dumped(work: Path, kind: str) -> int:
    """The instruction total of the dump named `kind` (callgrind_control -d names it)."""
    for dump in work.glob("callgrind.out*"):
        text = dump.read_text(errors="replace")
        if f"desc: Trigger: dump {kind}\n" in text:
            return max(int(line.split()[1]) for line in text.splitlines() if line.startswith(("summary:", "totals:")))
    raise RuntimeError(f"no callgrind dump for {kind} in {work}")


if __name__ == "__main__":
    os.chdir(REPO_ROOT)
    sys.exit(main())
