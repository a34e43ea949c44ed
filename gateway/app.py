"""create_app(settings) -> web.Application: wiring only.

Middleware order (outermost first): errors -> overload -> auth. Shared resources are built and
torn down in one cleanup context and reach handlers through a frozen `Deps`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.assembly.store import AssemblyStore
from gateway.capability import Keyring, Verifier, bearer_token, constant_time_equals
from gateway.deps import Deps
from gateway.errors import Unauthenticated
from gateway.http import (
    admin_routes,
    cost_routes,
    dashboard,
    journal_routes,
    openai_routes,
    plan_routes,
    surface_routes,
)
from gateway.http.keys import DEPS, deps_of
from gateway.http.middlewares import auth_middleware, errors_middleware
from gateway.http.overload import GATE, Gate, overload_middleware
from gateway.mcp import endpoint as mcp_endpoint
from gateway.mcp.upstream import ToolServers
from gateway.metrics import Metrics
from gateway.plugins import Registry
from gateway.providers.openai_compat import make_upstream_client
from gateway.providers.registry import breaker_states, build_providers
from gateway.redis_client import close as close_redis
from gateway.redis_client import make_redis
from gateway.request_log import RequestLog, configure
from gateway.sessions import SessionStore
from gateway.settings import Settings
from gateway.state.ledger import REDIS_ERRORS, Ledger
from gateway.state.reaper import run_reaper
from gateway.tracing import build_tracer


def create_app(
    settings: Settings, *, redis_url: str, keyring: Keyring, run_reaper_task: bool = True,
    plugins: Registry | None = None,
) -> web.Application:
    """`plugins`: what this replica can run; absent, the `abc_gateway.plugins` entry points."""
    configure(settings.log)
    app = web.Application(
        middlewares=[errors_middleware, overload_middleware, auth_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    registry = plugins if plugins is not None else Registry.from_entry_points()
    app.cleanup_ctx.append(_resources(settings, redis_url, keyring, run_reaper_task, registry))
    app.on_response_prepare.append(_server_header)
    openai_routes.add_routes(app)
    surface_routes.add_routes(app)
    admin_routes.add_routes(app)
    cost_routes.add_routes(app)
    dashboard.add_routes(app)
    journal_routes.add_routes(app)
    mcp_endpoint.add_routes(app)
    plan_routes.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def _resources(settings: Settings, redis_url: str, keyring: Keyring, reaper: bool, registry: Registry) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        redis = make_redis(redis_url, settings.redis)
        http = make_upstream_client()
        metrics = Metrics()
        tracer = build_tracer(settings.otel)
        ledger = Ledger(
            redis,
            reservation_ttl_s=settings.budget.reservation_ttl_s,
            journal_retention_s=settings.journal.retention_s,
            shards=settings.redis.shards,
            wait_replicas=settings.redis.wait_replicas,
            wait_timeout_ms=settings.redis.wait_timeout_ms,
            lease_s=settings.budget.lease_s,
            settle_backlog=settings.budget.settle_backlog,
            observe=metrics.observe_journal_write,
            count=metrics.count_ledger_event,
        )
        metrics.watch_settle_backlog(lambda: len(ledger.backlog))
        with contextlib.suppress(Exception):
            await ledger.load_scripts()  # Redis may come up later; scripts load on first use
        deps = Deps(
            settings=settings,
            redis=redis,
            ledger=ledger,
            assemblies=AssemblyStore(redis),
            sessions=SessionStore(redis, ledger, keyring, retention_s=settings.journal.retention_s),
            keyring=keyring,
            verifier=Verifier(keyring),
            providers=build_providers(settings, http, observe=metrics.observe_attempt, tracer=tracer),
            known_models=frozenset(m.name.strip().lower() for m in settings.models),
            metrics=metrics,
            plugins=registry,
            tool_servers=ToolServers(settings),
            tasks=set(),
            request_log=RequestLog(settings.log),
            tracer=tracer,
        )
        app[DEPS] = deps
        app[GATE] = Gate(settings.server.max_in_flight, settings.server.retry_after_s, metrics)
        reaper_stop = asyncio.Event()
        reaper_task = asyncio.create_task(run_reaper(redis, ledger, settings.budget.reaper_interval_s, reaper_stop, metrics)) if reaper else None
        leases_stop = asyncio.Event()
        leases_task = asyncio.create_task(ledger.keep_leases(leases_stop))
        yield
        if reaper_task is not None:
            # Let a pass in progress finish before Redis goes away under it; never wait long.
            reaper_stop.set()
            if not (await asyncio.wait([reaper_task], timeout=2))[0]:
                reaper_task.cancel()
        if deps.tasks:
            # Settlements and journal writes in flight finish before we let go of Redis.
            await asyncio.wait(list(deps.tasks), timeout=10)
        leases_stop.set()
        if not (await asyncio.wait([leases_task], timeout=2))[0]:
            leases_task.cancel()
        for provider in deps.providers.values():
            await provider.close()
        await deps.tool_servers.close()
        await http.close()
        await asyncio.get_running_loop().run_in_executor(None, tracer.shutdown)  # flushes spans
        await ledger.aclose()
        await close_redis(redis)

    return ctx


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp's default names its and Python's versions; that helps attackers, not users.
    response.headers["Server"] = "abc-gateway"


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = deps_of(request)
    try:
        await deps.redis.ping()  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    except REDIS_ERRORS:
        return web.json_response({"status": "unavailable", "redis": "down"}, status=503)
    return web.json_response({
        "status": "ready", "redis": "ok", "providers": sorted(deps.providers), "breakers": breaker_states(dict(deps.providers)),
    })


async def metrics(request: web.Request) -> web.Response:
    deps = deps_of(request)
    if not deps.settings.server.metrics_enabled:
        raise web.HTTPNotFound()
    required = deps.settings.metrics_token
    if required is not None:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None or not constant_time_equals(token, required.get_secret_value()):
            raise Unauthenticated("invalid metrics token")
    return web.Response(body=deps.metrics.render(), content_type="text/plain", charset="utf-8")
