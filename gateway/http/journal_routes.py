"""The journal admin API: page through a session's journal, verify and replay it, trim it
after an export. Behind the admin token like every /admin route.

    GET  /admin/v1/sessions/{id}/journal?after=&limit=&format=   (format=export: fields as stored)
    POST /admin/v1/sessions/{id}/replay        {"mode": "verify" | "recorded" | "live", ...}
    POST /admin/v1/sessions/{id}/journal/trim  {"through": entry id, "exported_hash": its hash}
"""

from __future__ import annotations

from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import InvalidRequest
from gateway.http.bodies import json_response, read_json_object, validated
from gateway.http.keys import deps_of
from gateway.journal.live import run_live
from gateway.journal.recorded import open_recorded, verify_session
from gateway.state import export

DEFAULT_LIMIT = 100
SESSION_ID = r"^sess_[0-9a-f]{8,64}$"


class ReplaySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["verify", "recorded", "live"]
    # live only: which recorded calls to run now, and the live session of earlier pages.
    offset: Annotated[int, Field(ge=0)] = 0
    limit: Annotated[int, Field(ge=1, le=export.PAGE)] | None = None
    into: Annotated[str, Field(pattern=SESSION_ID)] | None = None


class TrimSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    through: Annotated[str, Field(pattern=r"^[0-9]+-[0-9]+$")]
    exported_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]




def _int_param(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from 1 to {high}", param=name)
    return int(raw)


async def journal_page(request: web.Request) -> web.Response:
    deps = deps_of(request)
    session_id = request.match_info["session_id"]
    await deps.sessions.get(session_id)  # 404 for an unknown session
    after = request.query.get("after") or None
    if after is not None and not export.is_entry_id(after):
        raise InvalidRequest("after must be a journal entry id such as 1700000000000-0", param="after")
    limit = _int_param(request, "limit", DEFAULT_LIMIT, export.PAGE)
    form = request.query.get("format", "decoded")
    if form not in ("decoded", "export"):
        raise InvalidRequest("format must be decoded or export", param="format")
    page = await export.read_page(deps.redis, session_id, after=after, limit=limit)
    render = export.export_line if form == "export" else export.decoded
    return json_response({
        "object": "list", "session_id": session_id,
        "entries": [render(entry_id, fields) for entry_id, fields in page],
        "next": page[-1][0].decode() if len(page) == limit else None,
    })


async def replay(request: web.Request) -> web.Response:
    deps = deps_of(request)
    source = request.match_info["session_id"]
    spec: ReplaySpec = validated(ReplaySpec, await read_json_object(request))
    if spec.mode != "live" and (spec.offset or spec.limit is not None or spec.into is not None):
        raise InvalidRequest("offset, limit and into apply to live replays only", param="mode")
    await deps.sessions.get(source)
    if spec.mode == "verify":
        report = await verify_session(deps.redis, source)
        return json_response({"mode": "verify", "session_id": source, **report.to_dict()})
    if spec.mode == "recorded":
        return json_response(await open_recorded(deps, source), status=201)
    return json_response(await run_live(deps, source, offset=spec.offset, limit=spec.limit, into=spec.into))


async def trim(request: web.Request) -> web.Response:
    deps = deps_of(request)
    session_id = request.match_info["session_id"]
    spec: TrimSpec = validated(TrimSpec, await read_json_object(request))
    await deps.sessions.get(session_id)
    done = await export.trim_through(deps.redis, session_id, through=spec.through, exported_hash=spec.exported_hash)
    return json_response({"session_id": session_id, **done})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/v1/sessions/{session_id}/journal", journal_page)
    r.add_post("/admin/v1/sessions/{session_id}/replay", replay)
    r.add_post("/admin/v1/sessions/{session_id}/journal/trim", trim)
