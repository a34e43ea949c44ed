"""The decision plane's admin API (admin token, JSON): versions, diffs, suggestions and
counterfactual evaluations. Nothing here changes a session or a stored Assembly; the
latest suggestion and evaluation of each plan are kept for the dashboard's plan page.

    GET  /admin/v1/plans/{name}                    versions + latest suggestions + last evaluation
    GET  /admin/v1/plans/{name}/versions           the lineage, with sessions per version
    GET  /admin/v1/plans/{name}/suggestions?since= a revised plan, each change with its evidence
    GET  /admin/v1/assemblies/{a}/diff/{b}         the semantic diff of two Assemblies
    POST /admin/v1/plans/evaluate                  {"plan", "sessions": [...]} or {"plan", "sessions_of", "since"?},
                                                   and "model_map"?, "live"? {"budget_usd"?}: see below

`model_map` ({recorded model: candidate model}) asks a candidate that swaps a model the same
questions. `live` also runs the requests the candidate allows against its models, within
a cap (gateway/decision/rerun.py): the one thing here that calls providers and spends.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway import redis_keys as keys
from gateway.assembly.compile import compile_plan
from gateway.assembly.model import Assembly
from gateway.assembly.plan import PlanInvalid, parse_plan
from gateway.decision.diff import diff_assemblies
from gateway.decision.evaluate import Evaluation, evaluate, with_models
from gateway.decision.observe import SessionLog, read_session, read_sessions
from gateway.decision.rerun import DEFAULT_CAP_NANOS, run_live
from gateway.decision.suggest import suggest
from gateway.decision.versions import PlanVersions
from gateway.deps import Deps
from gateway.errors import InvalidRequest, NotFound
from gateway.http.admin_routes import PlanRejected
from gateway.http.bodies import json_response, read_json_object, validated
from gateway.http.keys import deps_of
from gateway.money import usd_to_nanos
from gateway.reports import parse_instant

MAX_SESSIONS = 200
SESSION_ID = r"^sess_[0-9a-f]{8,64}$"
MAX_LIVE_USD = 10_000
Name = Annotated[str, Field(min_length=1, max_length=256)]


class LiveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The cap on what the live run may spend, over all its sessions; absent: DEFAULT_CAP_NANOS.
    budget_usd: Annotated[float, Field(gt=0, le=MAX_LIVE_USD, allow_inf_nan=False, strict=True)] | None = None


class EvaluateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: dict[str, Any]
    sessions: Annotated[list[Annotated[str, Field(pattern=SESSION_ID)]], Field(max_length=MAX_SESSIONS)] | None = None
    sessions_of: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    since: str | None = None
    model_map: Annotated[dict[Name, Name], Field(max_length=64)] = Field(default_factory=dict)
    live: LiveSpec | None = None


def versions_of(deps: Deps) -> PlanVersions:
    return PlanVersions(deps.redis)


def _since_ms(raw: str | None) -> int | None:
    return None if not raw else int(parse_instant(raw, param="since").timestamp() * 1000)


async def versions(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    found = await versions_of(deps_of(request)).list(name)
    return json_response({"object": "list", "plan": name, "data": [v.to_dict() for v in found]})


async def plan_page(request: web.Request) -> web.Response:
    deps, name = deps_of(request), request.match_info["name"]
    found = await versions_of(deps).list(name)
    reports = await deps.redis.hgetall(keys.plan_reports(name))  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    return json_response({
        "plan": name,
        "versions": [v.to_dict() for v in found],
        "suggestions": orjson.Fragment(reports[b"suggestions"]) if b"suggestions" in reports else None,
        "evaluation": orjson.Fragment(reports[b"evaluation"]) if b"evaluation" in reports else None,
    })


async def diff(request: web.Request) -> web.Response:
    store = deps_of(request).assemblies
    a = await store.get(request.match_info["a"])
    b = await store.get(request.match_info["b"])
    changes = diff_assemblies(a, b)
    return json_response({"from": a.id, "to": b.id, "changes": [c.to_dict() for c in changes]})


async def _originals(deps: Deps, logs: list[SessionLog]) -> dict[str, Assembly]:
    return {asm_id: await deps.assemblies.get(asm_id) for asm_id in sorted({log.assembly_id for log in logs})}


async def suggestions(request: web.Request) -> web.Response:
    deps, name = deps_of(request), request.match_info["name"]
    plans = versions_of(deps)
    head = await plans.head(name)
    base = await deps.assemblies.get(head.assembly_id)
    session_ids = await plans.sessions(name, since_ms=_since_ms(request.query.get("since")))
    logs = await read_sessions(deps.redis, session_ids)
    found = suggest(await plans.plan_of(base), base, logs, deps.settings, await _originals(deps, logs))
    report = {**found.to_dict(), "version": head.version, "since": request.query.get("since"), "at": _now()}
    body = orjson.dumps(report)
    await deps.redis.hset(keys.plan_reports(name), mapping={"suggestions": body})  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    return web.Response(body=body, content_type="application/json")


async def evaluate_route(request: web.Request) -> web.Response:
    deps = deps_of(request)
    spec: EvaluateSpec = validated(EvaluateSpec, await read_json_object(request))
    if (spec.sessions is None) == (spec.sessions_of is None):
        raise InvalidRequest("give either sessions (a list of ids) or sessions_of (a plan name)", param="sessions")
    cap = _live_cap(spec.live)
    try:
        compiled = compile_plan(parse_plan(spec.plan), deps.settings)
    except PlanInvalid as exc:
        problems = [p.to_dict() for p in exc.problems]
        raise PlanRejected(f"invalid plan: {len(problems)} problem(s)", extra={"problems": problems}) from None
    logs = with_models(await _logs(deps, spec), spec.model_map)
    result = evaluate(deps, compiled.assembly, compiled.warnings, logs, await _originals(deps, logs))
    report = {**result.to_dict(), "at": _now(), "sessions_of": spec.sessions_of, "since": spec.since,
              "model_map": spec.model_map, "live": None}
    if spec.live is not None:
        report.update(await _live(deps, result, logs, cap, default=spec.live.budget_usd is None))
    body = orjson.dumps(report)
    await deps.redis.hset(keys.plan_reports(compiled.assembly.name), mapping={"evaluation": body})  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    return web.Response(body=body, content_type="application/json")


def _live_cap(spec: LiveSpec | None) -> int:
    if spec is None or spec.budget_usd is None:
        return DEFAULT_CAP_NANOS
    cap = usd_to_nanos(spec.budget_usd)
    if cap <= 0:
        raise InvalidRequest("live.budget_usd must be at least one nano-dollar (1e-9)", param="live.budget_usd")
    return cap


async def _live(deps: Deps, result: Evaluation, logs: list[SessionLog], cap: int, *, default: bool) -> dict[str, Any]:
    run = await run_live(deps, result, logs, cap_nanos=cap, cap_default=default)
    return {"live": run.to_dict(), "provider_calls": run.sent}


async def _logs(deps: Deps, spec: EvaluateSpec) -> list[SessionLog]:
    if spec.sessions_of is not None:
        ids = await versions_of(deps).sessions(spec.sessions_of, since_ms=_since_ms(spec.since))
        return (await read_sessions(deps.redis, ids))[-MAX_SESSIONS:]
    logs = []
    for session_id in dict.fromkeys(spec.sessions or []):
        log = await read_session(deps.redis, session_id, replays=True)
        if log is None:
            raise NotFound(f"session {session_id!r} not found", param="sessions", code="session_not_found")
        logs.append(log)
    return logs


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/v1/plans/evaluate", evaluate_route)
    r.add_get("/admin/v1/plans/{name}", plan_page)
    r.add_get("/admin/v1/plans/{name}/versions", versions)
    r.add_get("/admin/v1/plans/{name}/suggestions", suggestions)
    r.add_get("/admin/v1/assemblies/{a}/diff/{b}", diff)
