"""The Responses API and Anthropic Messages routes: the request in chat form for the PEP,
one Exchange like any chat call, the answer in the client's dialect (passed through from
a native upstream, else translated). The journal keeps what the client got."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.capability import Claims
from gateway.deps import Deps
from gateway.http import sse
from gateway.http.bodies import read_json_request
from gateway.http.keys import REQUEST_ID, claims_of, deps_of
from gateway.journal import stored_responses
from gateway.pipeline import dialects
from gateway.pipeline.exchange import Call, Exchange, exchange, require_live_session, shielded
from gateway.providers.base import Endpoint
from gateway.state import idempotency
from gateway.translate import messages, responses

MESSAGES_PATH = "/v1/messages"


async def _run(request: web.Request, endpoint: Endpoint, view: dict[str, Any], turn: dialects.Turn, raw: bytes) -> tuple[Exchange, web.StreamResponse]:
    deps = deps_of(request)
    call = Call(
        request[REQUEST_ID], endpoint, turn.body, claims_of(request), view=view, raw=raw,
        idempotency_key=idempotency.key_of(request.headers.get(idempotency.HEADER)),
    )
    async with exchange(deps, call) as ex:
        if ex.stored is not None:
            headers = {**ex.stored.headers, "idempotent-replayed": "true"}
            return ex, web.Response(status=ex.stored.status, body=ex.stored.body, headers=headers)
        ex.extra.update(turn.extra)
        wire = turn.wire(ex.provider, ex.grant, plugins=bool(ex.plugin_run))
        if ex.grant.stream:
            translator = None if wire is not None else turn.dialect.translator(
                turn.body, turn.seed(call.request_id, "stream"), str(ex.grant.body.get("model", "")))
            chunks = ex.stream_native(wire) if wire is not None else ex.stream(translator)
            return ex, await sse.relay_events(request, ex, chunks, turn.dialect.error_event)
        answer = await ex.send(wire)
        if wire is None:  # a chat answer: the client gets its translation
            assert ex.answer_data is not None
            seed = turn.seed(call.request_id, ex.answer_data.get("id"))
            answer = orjson.dumps(turn.dialect.from_chat(ex.answer_data, turn.body, seed))
            ex.restate(answer)
    assert ex.settled is not None
    headers = ex.answer_headers(ex.settled.cost_nanos, ex.settled.budget_left_nanos)
    return ex, web.Response(body=answer, content_type="application/json", headers=headers)


async def create_response(request: web.Request) -> web.StreamResponse:
    deps = deps_of(request)
    body, raw = await read_json_request(request)
    claims = claims_of(request)
    previous = body.get("previous_response_id")
    history = await stored_responses.history(deps.redis, claims.session_id, previous)
    view = responses.to_chat(body, history)
    extra = {stored_responses.INPUT_FIELD: orjson.dumps(responses.input_items(body.get("input"))),
             stored_responses.PREVIOUS_FIELD: previous}
    ex, response = await _run(request, Endpoint.RESPONSES, view, dialects.Turn(dialects.RESPONSES, body, history, extra), raw)
    if body.get("store", True) is not False and ex.settled is not None and ex.settled.error is None and ex.settled.entry_id:
        await shielded(deps, _index(deps, claims, ex, response))
    return response


async def _index(deps: Deps, claims: Claims, ex: Exchange, response: web.StreamResponse) -> None:
    """The response id -> the journal entry that holds it, kept as long as the journal."""
    assert ex.settled is not None
    response_id = _response_id(ex, response)
    if response_id:
        keep_until = claims.expires_at + deps.settings.journal.retention_s
        await stored_responses.remember(deps.redis, claims.session_id, response_id, ex.settled.entry_id, keep_until)


def _response_id(ex: Exchange, response: web.StreamResponse) -> str | None:
    """The id of the Response the client got: the answer's, or a stream's last event's."""
    if ex.tail:
        data = orjson.loads(ex.tail[-1]).get("response")
    else:
        assert isinstance(response, web.Response) and isinstance(response.body, bytes)
        data = orjson.loads(response.body)
    found = data.get("id") if isinstance(data, dict) else None
    return found if isinstance(found, str) else None


async def get_response(request: web.Request) -> web.Response:
    deps = deps_of(request)
    claims = claims_of(request)
    await require_live_session(deps, claims.session_id)
    stored = await stored_responses.load(deps.redis, claims.session_id, request.match_info["response_id"])
    return web.Response(body=stored.raw, content_type="application/json")


async def create_message(request: web.Request) -> web.StreamResponse:
    body, raw = await read_json_request(request)
    _, response = await _run(request, Endpoint.MESSAGES, messages.to_chat(body), dialects.Turn(dialects.MESSAGES, body), raw)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_post(MESSAGES_PATH, create_message)
