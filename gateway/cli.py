"""abc-gateway: serve | demo | compile | admin ... | replay | journal export | plan ..."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(args: argparse.Namespace) -> int:
    # Until the server installs its own handlers, SIGTERM unwinds like Ctrl-C does, so the
    # `finally` below still stops an embedded redis-server (it runs in its own session).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    from gateway.request_log import configure
    from gateway.server import keyring_for, redis_url_for, serve_forever, startup_fields
    from gateway.settings import config_path, load_settings

    config = config_path(args.config)
    settings = load_settings(config)
    configure(settings.log)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    workers = args.workers or settings.server.workers
    keyring = keyring_for(settings)
    unset = settings.unset_credentials()
    if unset:
        logging.getLogger("gateway.server").warning(
            "credentials not set: these upstream calls go out without them", extra={"fields": {"unset": unset}},
        )
    redis_url, embedded = redis_url_for(settings)
    started = startup_fields(settings, config=config, redis_url=redis_url, embedded=embedded is not None, host=host, port=port, workers=workers)
    try:
        if workers > 1:
            return _prefork(args, workers, host, port, redis_url, started)
        _install_uvloop()
        try:
            # A prefork worker (--reuse-port) leaves the start-up line to its parent.
            serve_forever(settings, redis_url=redis_url, keyring=keyring, host=host, port=port, reuse_port=args.reuse_port,
                          started=None if args.reuse_port else started)
        except OSError as exc:  # binding the port is the only OSError that gets out of the server
            raise ConfigError(f"cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}") from None
        return 0
    finally:
        if embedded is not None:
            embedded.stop()


def _metrics_dir() -> tuple[str, bool]:
    """The workers' shared metrics directory, emptied: PROMETHEUS_MULTIPROC_DIR when the
    operator set it, else a fresh one of ours (returns whether we made it)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        return tempfile.mkdtemp(prefix="abc-gateway-metrics-"), True
    Path(given).mkdir(parents=True, exist_ok=True)
    for stale in Path(given).glob("*.db"):  # a previous run's values would be summed in
        stale.unlink()
    return given, False


def _prefork(args: argparse.Namespace, workers: int, host: str, port: int, redis_url: str, started: dict[str, Any]) -> int:
    """N single-worker processes sharing the port with SO_REUSEPORT; the kernel balances.

    Workers get their own process group, so a terminal's Ctrl-C reaches only this parent,
    which passes it on once: a second signal would cut a worker's graceful shutdown short.
    Their metrics go to files in one directory, so any worker's /metrics shows the sum.
    """
    metrics_dir, ours = _metrics_dir()
    env = {**os.environ, "ABC_REDIS_URL": redis_url, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [sys.executable, "-m", "gateway", "serve", "--workers", "1", "--reuse-port", "--host", host, "--port", str(port)]
    if args.config:
        command += ["--config", args.config]
    children: list[subprocess.Popen[bytes]] = []
    signalled: set[int] = set()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                signalled.add(child.pid)
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        while len(children) < workers and not stopping:
            children.append(subprocess.Popen(command, env=env, process_group=0))
        logging.getLogger("gateway.server").info("listening", extra={"fields": started})
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        stopped_by_us = set(signalled)
        for child in children:  # a worker died, or one was started as the signal came in
            if child.pid not in signalled and child.poll() is None:
                stopped_by_us.add(child.pid)
                child.terminate()
        for child in children:
            child.wait()
        if ours:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    # A worker killed by a signal has a negative returncode; report it the way a shell does.
    # The worker that died on its own is the cause: its code wins over those we stopped.
    died = [child for child in children if child.pid not in stopped_by_us] or children
    codes = [128 - child.returncode if child.returncode < 0 else child.returncode for child in died]
    return max(codes, default=0)


def _install_uvloop() -> None:
    import uvloop

    uvloop.install()


def _compile(args: argparse.Namespace) -> int:
    import orjson

    from gateway.assembly.compile import compile_plan
    from gateway.assembly.plan import load_plan_file
    from gateway.mcp.upstream import discover_once
    from gateway.settings import load_settings

    plan, settings = load_plan_file(args.plan), load_settings(args.config)
    listings = asyncio.run(discover_once(settings, [entry.server for entry in plan.mcp])) if plan.mcp else None
    compiled = compile_plan(plan, settings, mcp_listings=listings)
    print(orjson.dumps(orjson.loads(compiled.assembly.canonical_json()), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    print(f"assembly_id: {compiled.assembly.id}", file=sys.stderr)
    for warning in compiled.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(config=args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abc-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=None, help="settings file (default: $ABC_CONFIG or config/gateway.yaml)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=None, help="processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)

    demo = sub.add_parser("demo", help="embedded Redis + mock provider + gateway, driven by the OpenAI SDK")
    demo.add_argument("--config", default=None)
    demo.set_defaults(run=_demo)

    comp = sub.add_parser("compile", help="compile a plan offline and print the Assembly")
    comp.add_argument("plan")
    comp.add_argument("--config", default=None)
    comp.set_defaults(run=_compile)

    from gateway.admin_cli import add_admin_commands

    add_admin_commands(sub)

    from gateway.journal_cli import add_journal_commands

    add_journal_commands(sub)

    from gateway.plan_cli import add_plan_commands

    add_plan_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"abc-gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
