"""The OpenAI-compatible routes: thin wrappers around the Exchange."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.errors import InvalidRequest
from gateway.http import sse
from gateway.http.bodies import read_json_request
from gateway.http.keys import REQUEST_ID, claims_of, deps_of, report_of
from gateway.pipeline.exchange import Call, exchange, journal_refusal, require_live_session
from gateway.providers.base import Endpoint
from gateway.state import idempotency


async def _proxy(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    deps, claims = deps_of(request), claims_of(request)
    try:
        body, raw = await read_json_request(request)
    except InvalidRequest as refused:
        raise await journal_refusal(deps, claims, request[REQUEST_ID], refused) from None
    call = Call(
        request[REQUEST_ID], endpoint, body, claims,
        idempotency_key=idempotency.key_of(request.headers.get(idempotency.HEADER)), raw=raw, report=report_of(request),
    )
    async with exchange(deps, call) as ex:
        if ex.stored is not None:
            # The first answer to this Idempotency-Key, as sent then (its x-request-id included).
            headers = {**ex.stored.headers, "idempotent-replayed": "true"}
            return web.Response(status=ex.stored.status, body=ex.stored.body, headers=headers)
        if ex.grant.stream:
            return await sse.relay(request, ex)
        answer = await ex.send()
    assert ex.settled is not None
    headers = ex.answer_headers(ex.settled.cost_nanos, ex.settled.budget_left_nanos)
    return web.Response(body=answer, content_type="application/json", headers=headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, Endpoint.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, Endpoint.COMPLETIONS)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, Endpoint.EMBEDDINGS)


async def list_models(request: web.Request) -> web.Response:
    """Only the models this token's VCS allows."""
    deps = deps_of(request)
    claims = claims_of(request)
    await require_live_session(deps, claims.session_id)
    assembly = await deps.assemblies.get(claims.assembly_id)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": assembly.models[name].provider}
        for name in assembly.vcs.models
    ]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
