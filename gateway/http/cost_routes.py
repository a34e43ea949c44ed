"""GET /admin/v1/costs: spend grouped by tenant, session, model or Assembly (admin token)."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.http.keys import deps_of
from gateway.reports import cost_report, resolve_window


async def costs(request: web.Request) -> web.Response:
    query = request.query
    since, until = resolve_window(query.get("since"), query.get("until"))
    report = await cost_report(deps_of(request).redis, query.get("group_by", "tenant"), since, until)
    return web.Response(body=orjson.dumps(report.to_dict()), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/costs", costs)
