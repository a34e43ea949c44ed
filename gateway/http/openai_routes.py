"""The OpenAI-compatible routes: thin wrappers around the request spine."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.http import sse
from gateway.http.bodies import read_json_request
from gateway.http.keys import REQUEST_ID, claims_of, deps_of
from gateway.pipeline import idempotency, spine
from gateway.providers.base import Endpoint


async def _proxy(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    deps = deps_of(request)
    body, raw = await read_json_request(request)
    call = spine.Call(
        request[REQUEST_ID], endpoint, body, claims_of(request),
        idempotency_key=idempotency.key_of(request.headers.get(idempotency.HEADER)), raw=raw,
    )
    admitted = await spine.admit(deps, call)
    if isinstance(admitted, idempotency.Stored):
        # The first answer to this Idempotency-Key, as sent then (its x-request-id included).
        headers = {**admitted.headers, "idempotent-replayed": "true"}
        return web.Response(status=admitted.status, body=admitted.body, headers=headers)
    if admitted.grant.stream:
        return await sse.relay(request, deps, admitted)
    answer = await spine.complete(deps, admitted)
    return web.Response(body=answer.body, content_type="application/json", headers=answer.headers)


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
    await spine.require_live_session(deps, claims.session_id)
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
