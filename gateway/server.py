"""Running the app: in the foreground (serve), or on a background thread (demo, tests)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from gateway import tokenizer
from gateway.app import create_app
from gateway.capability import PREVIOUS_KEYS_ENV, Keyring, generate_ed25519_key
from gateway.embedded_redis import EmbeddedRedis
from gateway.errors import ConfigError
from gateway.http.keys import DEPS
from gateway.http.overload import CappedSite
from gateway.http.protocol import GatewayRunner
from gateway.plugins import Registry
from gateway.settings import Settings

log = logging.getLogger("gateway.server")
YOUNG_GENERATION = 10_000  # allocations (net of frees) between collections of the youngest generation


def keyring_for(settings: Settings, *, demo_key_dir: Path | None = None) -> Keyring:
    """The signing keyring from ABC_SIGNING_KEY; only the demo may generate one."""
    key = settings.signing_key.get_secret_value() if settings.signing_key else None
    if key is None:
        if demo_key_dir is None:
            raise ConfigError("ABC_SIGNING_KEY is not set: a secret of 32+ characters (HS256) or an Ed25519 PEM path")
        path = demo_key_dir / "demo-signing-ed25519.pem"
        if not path.exists():
            generate_ed25519_key(path)
        key = str(path)
    return Keyring.from_env(key, os.environ.get(PREVIOUS_KEYS_ENV))


def redis_url_for(settings: Settings) -> tuple[str, EmbeddedRedis | None]:
    """ABC_REDIS_URL / redis.url, or an embedded redis-server under redis.data_dir."""
    if settings.redis.url:
        return settings.redis.url, None
    embedded = EmbeddedRedis(settings.redis.data_dir)
    return embedded.start(), embedded


def redacted_url(url: str) -> str:
    """`url` without its password (a Redis URL may carry one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def startup_fields(settings: Settings, *, config: Path, redis_url: str, embedded: bool, host: str, port: int, workers: int) -> dict[str, Any]:
    """What the start-up line tells an operator: which settings, which Redis, which providers, where."""
    return {
        "config": str(config), "redis": redacted_url(redis_url), "redis_embedded": embedded,
        "providers": [f"{p.name}:{p.kind}" for p in settings.providers], "models": len(settings.models),
        "listen": f"http://{host}:{port}", "workers": workers, "tracing": bool(settings.otel.endpoint), "pid": os.getpid(),
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def _start(app: web.Application, settings: Settings, host: str, port: int, reuse_port: bool) -> web.AppRunner:
    # auto_decompress off: a compressed body is refused with 415 (overload.refuse_encoded_body),
    # never inflated, so no zip bomb is expanded in memory before a handler sees it.
    runner = GatewayRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
    await runner.setup()
    try:
        await CappedSite(
            runner, host, port, reuse_port=reuse_port or None, backlog=1024,
            max_connections=settings.server.max_connections, retry_after_s=settings.server.retry_after_s,
            metrics=app[DEPS].metrics if DEPS in app else None,
        ).start()
    except BaseException:
        await runner.cleanup()  # the port is taken: release what startup built
        raise
    return runner


class BackgroundServer:
    """The gateway on its own thread and event loop, so sync clients can call it."""

    def __init__(
        self, settings: Settings, *, redis_url: str, keyring: Keyring, host: str = "127.0.0.1", port: int = 0,
        reaper: bool = True, plugins: Registry | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.settings = settings
        self.app = create_app(settings, redis_url=redis_url, keyring=keyring, run_reaper_task=reaper, plugins=plugins)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="abc-gateway", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(_start(self.app, self.settings, self.host, self.port, False), self._loop)
        self._runner = future.result(timeout=30)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(
    settings: Settings, *, redis_url: str, keyring: Keyring, host: str, port: int, reuse_port: bool = False,
    started: dict[str, Any] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully: stop accepting, let
    requests in flight finish (their settlements and journal writes included), close.
    Once listening, logs `started` (see startup_fields) as the start-up line."""
    app = create_app(settings, redis_url=redis_url, keyring=keyring)
    asyncio.run(_serve_until_signalled(app, settings, host, port, reuse_port, started))


async def _serve_until_signalled(
    app: web.Application, settings: Settings, host: str, port: int, reuse_port: bool, started: dict[str, Any] | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = await _start(app, settings, host, port, reuse_port)
    _settle_heap()
    if started is not None:
        log.info("listening", extra={"fields": started})
    # Listening already: the estimates' encodings load on a thread while requests are served.
    warming = loop.run_in_executor(None, tokenizer.warm, _encodings(settings))
    warming.add_done_callback(_warmed)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _encodings(settings: Settings) -> set[str]:
    """The tiktoken encodings the configured models' estimates use (as the compiler picks them)."""
    names = {m.encoding or tokenizer.encoding_name_for(m.target) or tokenizer.encoding_name_for(m.name) for m in settings.models}
    return {name for name in names if name}


def _settle_heap() -> None:
    """The objects made at start-up (modules, settings, Assemblies, encodings) live as long
    as the process: keep the cyclic collector from walking them again and again. And
    requests in flight hold thousands of young containers that die with their request,
    which a young generation of 700 (CPython's default) made the collector walk over and
    over: about 4% of the gateway's CPU at 32 connections under perf."""
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION, 10, 10)


def _warmed(done: asyncio.Future[None]) -> None:
    gc.freeze()  # the encodings, loaded since
    if not done.cancelled() and done.exception() is not None:
        # The first request that needs the encoding will fail with the reason; say it here first.
        log.warning("could not load the token encodings: %s", type(done.exception()).__name__)
