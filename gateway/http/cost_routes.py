"""GET /admin/v1/costs and /admin/v1/costs/series: spend grouped by tenant, session, model
or Assembly, in total or per hour (admin token)."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.http.keys import deps_of
from gateway.reports import cost_report, cost_series, resolve_window


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


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/costs", costs)
    app.router.add_get("/admin/v1/costs/series", costs_series)
