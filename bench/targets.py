"""What the load is pointed at: the mock directly, ABC (with a real redis-server), LiteLLM.

Each start function returns a Target: its base URL, the Authorization value to send,
and the processes whose CPU and memory the report shows. LiteLLM lives in
bench/litellm_target.py because installing it is a story of its own.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.httpcall import call_json, wait_for_200
from bench.procs import Child, Supervisor, free_port

CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
REPO_ROOT = Path(__file__).resolve().parent.parent


class TargetFailed(Exception):
    """A target could not be started or set up; the message says why, with its log tail."""


@dataclass
class Target:
    name: str
    label: str
    base_url: str  # ends in /v1
    authorization: str | None = None
    roles: dict[str, Child] = field(default_factory=dict)  # "gateway", "redis", "mock"
    own: list[Child] = field(default_factory=list)  # stopped with the target
    redis_port: int | None = None
    startup_s: float | None = None
    idle_rss_bytes: int | None = None
    unsupported: dict[str, str] = field(default_factory=dict)  # scenario kind -> reason
    notes: list[str] = field(default_factory=list)
    gateway_cpus: str | None = None

    @property
    def gateway(self) -> Child | None:
        return self.roles.get("gateway")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Settings of an outer shell must not leak into the processes measured.
    for name in ("ABC_CONFIG", "ABC_REDIS_URL", "ABC_METRICS_TOKEN", "DATABASE_URL"):
        env.pop(name, None)
    # An HTTP proxy in the environment would put a third hop between gateway and mock.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def tool_env(**extra: str) -> dict[str, str]:
    """For the bench's own Python tools: `python -m bench.<tool>` from any directory."""
    env = child_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_mock(sup: Supervisor, *, cpus: str | None, delay_ms: float) -> tuple[Child, int]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.mock_upstream", "--port", str(port)]
    argv += ["--delay-ms", str(delay_ms)]
    mock = sup.start("mock", argv, cpus=cpus, env=tool_env())
    try:
        wait_for_200(
            f"http://127.0.0.1:{port}/health",
            started=time.monotonic(),
            timeout_s=30,
            still_running=mock.alive,
        )
    except (RuntimeError, TimeoutError) as exc:
        raise TargetFailed(f"mock upstream: {exc}\n{mock.tail()}") from None
    return mock, port


def direct_target(mock: Child, mock_port: int) -> Target:
    return Target(
        name="direct",
        label="direct (mock)",
        base_url=f"http://127.0.0.1:{mock_port}/v1",
        roles={"mock": mock},
    )


def start_redis(
    sup: Supervisor, *, name: str, cpus: str | None, workdir: Path
) -> tuple[Child, int]:
    port = free_port()
    data_dir = workdir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    # No persistence: the bench measures the gateway's round trips, not the disk's fsync.
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(data_dir)]
    redis = sup.start(name, argv, cpus=cpus)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return redis, port
        except OSError:
            pass
        if not redis.alive():
            break
        time.sleep(0.02)
    raise TargetFailed(f"redis-server did not start\n{redis.tail()}")


def gateway_settings(mock_port: int, workers: int | None) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "providers": [
            {
                "name": "bench",
                "kind": "openai",
                "api_base": f"http://127.0.0.1:{mock_port}/v1",
                "api_key_env": UPSTREAM_KEY_ENV,
            }
        ],
        "models": [
            {
                "name": CHAT_MODEL,
                "provider": "bench",
                "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
            },
            {
                "name": EMBEDDING_MODEL,
                "provider": "bench",
                "kind": "embedding",
                "price": {"input_per_mtok": 0.02, "output_per_mtok": 0},
            },
        ],
    }
    if workers is not None:
        settings["server"] = {"workers": workers}
    return settings


def bench_plan(*, with_embeddings: bool) -> dict[str, Any]:
    models: list[dict[str, Any]] = [{"name": CHAT_MODEL, "max_tokens": 256}]
    if with_embeddings:
        models.append({"name": EMBEDDING_MODEL, "max_tokens": 1})
    return {
        "name": "bench",
        "models": models,
        # Ample: a chat request reserves at most ~$0.0002, so even the leak check's 100k
        # requests use under $20; the budget is still checked on every request.
        "budget": {"usd": 1_000_000, "requests": 100_000_000, "tokens": 100_000_000_000},
        "ttl_s": 86400,
    }


@functools.cache
def serve_accepts_workers(exe: str) -> bool:
    try:
        done = subprocess.run(
            [exe, "serve", "--help"], capture_output=True, text=True, timeout=60, env=child_env()
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in done.stdout


def gateway_executable() -> Path:
    # The console script of the venv running the bench (.venv/bin/abc-gateway).
    return Path(sys.executable).parent / "abc-gateway"


def start_abc(
    sup: Supervisor,
    *,
    name: str,
    mock: Child,
    mock_port: int,
    workers: int,
    gateway_cpus: str | None,
    redis_cpus: str | None,
    workdir: Path,
    command_prefix: list[str] | None = None,
    redis_timeout_ms: int | None = None,
) -> Target:
    """redis-server, then the gateway, then a compiled plan and a session token.

    command_prefix replaces the `abc-gateway` executable (to run it under a profiler);
    redis_timeout_ms, the gateway's deadline on Redis (under valgrind, 50 times slower).
    """
    exe = gateway_executable()
    if not exe.exists():
        raise TargetFailed(f"{exe} not found: install the project into the venv (pip install -e .)")
    redis, redis_port = start_redis(sup, name=f"{name}-redis", cpus=redis_cpus, workdir=workdir)
    target = Target(
        name=name,
        label=f"ABC ({workers} worker{'s' if workers > 1 else ''})",
        base_url="",
        roles={"redis": redis, "mock": mock},
        own=[redis],
        redis_port=redis_port,
        gateway_cpus=gateway_cpus,
    )
    try:
        admin_token = _start_gateway(
            sup,
            target,
            command=command_prefix or [str(exe)],
            mock_port=mock_port,
            workers=workers,
            workdir=workdir,
            redis_timeout_ms=redis_timeout_ms,
        )
        _open_session(target, admin_token)
    except BaseException:
        for child in target.own:
            sup.stop(child)
        raise
    return target


def _start_gateway(
    sup: Supervisor,
    target: Target,
    *,
    command: list[str],
    mock_port: int,
    workers: int,
    workdir: Path,
    redis_timeout_ms: int | None,
) -> str:
    """Start the gateway, record its start-up and idle RSS; returns its admin token."""
    flag = serve_accepts_workers(str(gateway_executable()))
    settings_path = workdir / f"{target.name}-gateway.yaml"
    # Without a --workers flag, the settings file is the only way to ask for more.
    yaml_workers = workers if (not flag and workers != 1) else None
    settings = gateway_settings(mock_port, yaml_workers)
    if redis_timeout_ms is not None:
        settings["redis"] = {"timeout_ms": redis_timeout_ms}
    settings_path.write_text(yaml.safe_dump(settings))
    port = free_port()
    argv = [*command, "serve", "--config", str(settings_path), "--host", "127.0.0.1"]
    argv += ["--port", str(port)]
    if flag:
        argv += ["--workers", str(workers)]
    admin_token = secrets.token_urlsafe(24)
    env = child_env(
        ABC_REDIS_URL=f"redis://127.0.0.1:{target.redis_port}/0",
        ABC_ADMIN_TOKEN=admin_token,
        ABC_SIGNING_KEY=secrets.token_urlsafe(36),  # 48 characters
        **{UPSTREAM_KEY_ENV: "sk-bench-upstream"},
    )
    started = time.monotonic()
    gateway = sup.start(f"{target.name}-gateway", argv, cpus=target.gateway_cpus, env=env)
    target.roles["gateway"] = gateway
    target.own.append(gateway)
    root = f"http://127.0.0.1:{port}"
    try:
        target.startup_s = wait_for_200(
            f"{root}/readyz", started=started, timeout_s=60, still_running=gateway.alive
        )
    except (RuntimeError, TimeoutError) as exc:
        raise TargetFailed(
            f"gateway: {exc}\n--- last lines of its output ---\n{gateway.tail()}"
        ) from None
    target.idle_rss_bytes = gateway.rss_bytes()
    target.base_url = f"{root}/v1"
    # Returned, not stored on the Target, so nothing that prints a Target can leak it.
    return admin_token


def _open_session(target: Target, admin_token: str) -> None:
    root = target.base_url.removesuffix("/v1")
    auth = {"Authorization": f"Bearer {admin_token}"}
    status, body = call_json(
        "POST", f"{root}/admin/v1/plans/compile", bench_plan(with_embeddings=True), headers=auth
    )
    if status != 201:
        # Embeddings may not fit the plan's max_tokens rules; chat must still be measured.
        first_problem = f"{status}: {_short(body)}"
        status, body = call_json(
            "POST",
            f"{root}/admin/v1/plans/compile",
            bench_plan(with_embeddings=False),
            headers=auth,
        )
        if status != 201:
            raise TargetFailed(
                "admin API: POST /admin/v1/plans/compile failed "
                f"(with embeddings: {first_problem}; without: {status}: {_short(body)})"
                f"\n--- gateway output ---\n{target.roles['gateway'].tail()}"
            )
        target.unsupported["embeddings"] = (
            f"plan with an embeddings entry was rejected by the compiler ({first_problem})"
        )
    if not isinstance(body, dict) or "assembly_id" not in body:
        raise TargetFailed(f"admin API: compile answered 201 without assembly_id: {_short(body)}")
    for warning in body.get("warnings") or []:
        target.notes.append(f"compile warning: {_short(warning)}")
    status, session = call_json(
        "POST", f"{root}/admin/v1/sessions", {"assembly_id": body["assembly_id"]}, headers=auth
    )
    if status != 201 or not isinstance(session, dict) or "token" not in session:
        raise TargetFailed(
            f"admin API: POST /admin/v1/sessions -> {status}: {_short(session)}"
            f"\n--- gateway output ---\n{target.roles['gateway'].tail()}"
        )
    target.authorization = f"Bearer {session['token']}"


def _short(value: object, limit: int = 400) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
