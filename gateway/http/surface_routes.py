"""The Responses API and Anthropic Messages routes: translate to chat form for the PEP,
admit through the spine like any chat call, answer in the client's dialect."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.capability import Claims
from gateway.deps import Deps
from gateway.http.bodies import read_json_request
from gateway.http.keys import REQUEST_ID, claims_of, deps_of
from gateway.journal import stored_responses
from gateway.pipeline import dialects, idempotency, spine, surfaces
from gateway.providers.base import Endpoint
from gateway.translate import messages, responses

MESSAGES_PATH = "/v1/messages"


async def _run(request: web.Request, endpoint: Endpoint, view: dict[str, Any], turn: surfaces.Turn,
               body: dict[str, Any], raw: bytes) -> web.StreamResponse:
    deps = deps_of(request)
    call = spine.Call(
        request[REQUEST_ID], endpoint, body, claims_of(request), view=view, raw=raw,
        idempotency_key=idempotency.key_of(request.headers.get(idempotency.HEADER)),
    )
    admitted = await spine.admit(deps, call)
    if isinstance(admitted, idempotency.Stored):
        headers = {**admitted.headers, "idempotent-replayed": "true"}
        return web.Response(status=admitted.status, body=admitted.body, headers=headers)
    if admitted.grant.stream:
        return await surfaces.relay(request, deps, admitted, turn)
    return await surfaces.send(deps, admitted, turn)


async def create_response(request: web.Request) -> web.StreamResponse:
    deps = deps_of(request)
    body, raw = await read_json_request(request)
    claims = claims_of(request)
    previous = body.get("previous_response_id")
    history = await stored_responses.history(deps.redis, claims.session_id, previous)
    view = responses.to_chat(body, history)
    extra = {stored_responses.INPUT_FIELD: orjson.dumps(responses.input_items(body.get("input"))),
             stored_responses.PREVIOUS_FIELD: previous}
    after = _index(deps, claims) if body.get("store", True) is not False else None
    turn = surfaces.Turn(dialects.RESPONSES, history, extra, after)
    return await _run(request, Endpoint.RESPONSES, view, turn, body, raw)


def _index(deps: Deps, claims: Claims) -> surfaces.AfterSettle:
    """Once the answer is journaled: its response id -> that entry, kept as long as the journal."""

    async def remember(adm: spine.Admitted, answer: bytes) -> None:
        response_id = _response_id(answer)
        if response_id and adm.outcome_entry:
            keep_until = claims.expires_at + deps.settings.journal.retention_s
            await stored_responses.remember(deps.redis, claims.session_id, response_id, adm.outcome_entry, keep_until)

    return remember


def _response_id(answer: bytes) -> str | None:
    """The id of a Response object, or of the one a stream's last event carries."""
    try:
        data = orjson.loads(answer)
    except orjson.JSONDecodeError:
        data = orjson.loads(answer.rsplit(b"\n", 1)[-1])  # a stream: payloads one per line
    if isinstance(data, dict) and isinstance(data.get("response"), dict):
        data = data["response"]
    found = data.get("id") if isinstance(data, dict) else None
    return found if isinstance(found, str) else None


async def get_response(request: web.Request) -> web.Response:
    deps = deps_of(request)
    claims = claims_of(request)
    await spine.require_live_session(deps, claims.session_id)
    stored = await stored_responses.load(deps.redis, claims.session_id, request.match_info["response_id"])
    return web.Response(body=stored.raw, content_type="application/json")


async def create_message(request: web.Request) -> web.StreamResponse:
    body, raw = await read_json_request(request)
    turn = surfaces.Turn(dialects.MESSAGES, [], {})
    return await _run(request, Endpoint.MESSAGES, messages.to_chat(body), turn, body, raw)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_post(MESSAGES_PATH, create_message)
