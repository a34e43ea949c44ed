"""The admin API (/admin/v1): compile plans, open and inspect sessions, journals, costs.

Every route here sits behind the admin token (see middlewares.auth_middleware).
"""

from __future__ import annotations

from typing import Annotated

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.assembly.compile import compile_plan
from gateway.assembly.plan import PlanInvalid, parse_plan
from gateway.decision.versions import PlanVersions
from gateway.errors import GatewayError, InvalidRequest
from gateway.http.bodies import json_response, read_json_object, validated
from gateway.http.keys import ADMIN_LABEL, deps_of
from gateway.money import usd_to_nanos


class PlanRejected(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "plan_invalid"


class OpenSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    assembly_id: Annotated[str, Field(pattern=r"^asm_[0-9a-f]{32,64}$")]
    tenant: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")] | None = None
    budget_usd: Annotated[float, Field(ge=0)] | None = None
    ttl_s: Annotated[int, Field(gt=0)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)



async def compile_route(request: web.Request) -> web.Response:
    deps = deps_of(request)
    body = await read_json_object(request)
    actor = _actor(request)
    try:
        plan = parse_plan(body)
        # Tool servers are asked for their tools now; the compiler itself does no I/O.
        listings = await deps.tool_servers.discover(entry.server for entry in plan.mcp)
        compiled = compile_plan(plan, deps.settings, mcp_listings=listings, registry=deps.plugins)
    except PlanInvalid as exc:
        raise PlanRejected(
            f"invalid plan: {len(exc.problems)} problem(s)", extra={"problems": [p.to_dict() for p in exc.problems]}
        ) from None
    await deps.assemblies.put(compiled.assembly)
    version, _ = await PlanVersions(deps.redis).record(plan, compiled.assembly, by=request[ADMIN_LABEL], actor=actor)
    return json_response(
        {
            "assembly_id": compiled.assembly.id,
            "assembly": orjson.Fragment(compiled.assembly.canonical_json()),
            "warnings": compiled.warnings,
            "version": version.version,
            "parent": version.parent,
        },
        status=201,
    )


def _actor(request: web.Request) -> str | None:
    """Who says they compiled (`x-abc-actor`), recorded beside the admin token's label.
    Self-declared: every holder of the one admin token can name anyone."""
    actor = request.headers.get("x-abc-actor")
    if actor is None:
        return None
    if not 0 < len(actor) <= 64 or not all(0x20 < ord(c) < 0x7F for c in actor):
        raise InvalidRequest("x-abc-actor must be 1-64 printable ASCII characters without spaces", param="x-abc-actor")
    return actor


async def get_assembly(request: web.Request) -> web.Response:
    assembly = await deps_of(request).assemblies.get(request.match_info["assembly_id"])
    return web.Response(body=assembly.canonical_json(), content_type="application/json")


async def list_assemblies(request: web.Request) -> web.Response:
    ids = await deps_of(request).assemblies.list()
    return json_response({"object": "list", "data": [{"assembly_id": i} for i in ids]})


async def open_session(request: web.Request) -> web.Response:
    deps = deps_of(request)
    spec: OpenSession = validated(OpenSession, await read_json_object(request))
    assembly = await deps.assemblies.get(spec.assembly_id)
    opened = await deps.sessions.open(
        assembly, tenant=spec.tenant, budget_nanos=None if spec.budget_usd is None else usd_to_nanos(spec.budget_usd), ttl_s=spec.ttl_s, labels=spec.labels
    )
    from gateway.money import nanos_to_usd_str

    return json_response(
        {
            "session_id": opened.session_id,
            "token": opened.token,
            "expires_at": opened.expires_at,
            "assembly_id": assembly.id,
            "budget_usd": None if opened.budget_nanos is None else nanos_to_usd_str(opened.budget_nanos),
        },
        status=201,
    )


async def show_session(request: web.Request) -> web.Response:
    return json_response(await deps_of(request).sessions.show(request.match_info["session_id"]))


async def revoke_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    await deps_of(request).sessions.revoke(session_id)
    return json_response({"session_id": session_id, "state": "revoked"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/v1/plans/compile", compile_route)
    r.add_get("/admin/v1/assemblies", list_assemblies)
    r.add_get("/admin/v1/assemblies/{assembly_id}", get_assembly)
    r.add_post("/admin/v1/sessions", open_session)
    r.add_get("/admin/v1/sessions/{session_id}", show_session)
    r.add_post("/admin/v1/sessions/{session_id}/revoke", revoke_session)
