"""GET /admin/v1/costs and /admin/v1/costs/series: spend grouped by tenant, session, model
or Assembly, in total or per hour; GET /admin/v1/dashboard: the dashboard's other panels
(denials per hour by reason, top sessions, gateway overhead, tool spend). Admin token."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.http.keys import deps_of
from gateway.money import nanos_to_usd_str
from gateway.reports import cost_report, cost_series, denial_series, resolve_window, tool_spend

TOP_SESSIONS = 10


async def costs(request: web.Request) -> web.Response:
    query = request.query
    since, until = resolve_window(query.get("since"), query.get("until"))
    deps = deps_of(request)
    report = await cost_report(deps.redis, query.get("group_by", "tenant"), since, until, shards=deps.settings.redis.shards)
    return web.Response(body=orjson.dumps(report.to_dict()), content_type="application/json")


async def costs_series(request: web.Request) -> web.Response:
    query = request.query
    since, until = resolve_window(query.get("since"), query.get("until"))
    deps = deps_of(request)
    series = await cost_series(deps.redis, query.get("group_by", "tenant"), since, until, shards=deps.settings.redis.shards)
    return web.Response(body=orjson.dumps(series.to_dict()), content_type="application/json")


async def dashboard_panels(request: web.Request) -> web.Response:
    deps = deps_of(request)
    since, until = resolve_window(request.query.get("since"), request.query.get("until"))
    sessions = await cost_report(deps.redis, "session", since, until, shards=deps.settings.redis.shards)
    count, (p50, p99) = deps.metrics.overhead_quantiles(0.5, 0.99)
    body = {
        "denials": await denial_series(deps.redis, since, until),
        "top_sessions": [
            {"session_id": r.key, "cost_nanos": r.nanos, "cost_usd": nanos_to_usd_str(r.nanos)}
            for r in sessions.rows[:TOP_SESSIONS]
        ],
        # Since this gateway (all its workers) started: a Prometheus histogram, not the journal.
        "overhead": {"count": count, "p50_ms": _ms(p50), "p99_ms": _ms(p99)},
        "tools": await tool_spend(deps.redis, since, until, shards=deps.settings.redis.shards),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/costs", costs)
    app.router.add_get("/admin/v1/costs/series", costs_series)
    app.router.add_get("/admin/v1/dashboard", dashboard_panels)
