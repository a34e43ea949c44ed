"""Relaying a streamed answer as Server-Sent Events, with its accounting.

The upstream is asked for usage even when the client did not ask; that extra chunk
is dropped before the client sees it. Errors before the first byte are ordinary
JSON errors; after it, an `error` data event and `[DONE]`. The stream is settled
and journaled before `[DONE]` goes out; a client that hangs up cancels the upstream
call and is charged for what was generated.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from aiohttp import web

from gateway import plugins
from gateway.deps import Deps
from gateway.errors import GatewayError, UpstreamError
from gateway.http.keys import REQUEST_ID
from gateway.journal.events import Kind
from gateway.pipeline import idempotency, policy
from gateway.pipeline.spine import Admitted, cost_headers, fail, finish, shielded
from gateway.pipeline.usage import StreamMeter

DONE = b"data: [DONE]\n\n"
_NULL_USAGE = b',"usage":null'
CLIENT_GONE = (ConnectionResetError, asyncio.CancelledError)


def _upstream_body(adm: Admitted) -> tuple[dict[str, Any], bool]:
    """The body with include_usage forced on; returns whether the client asked for it."""
    body = adm.grant.body
    given = body.get("stream_options")
    options: dict[str, Any] = given if isinstance(given, dict) else {}
    client_wants_usage = bool(options.get("include_usage"))
    return {**body, "stream_options": {**options, "include_usage": True}}, client_wants_usage


async def relay(request: web.Request, deps: Deps, adm: Admitted) -> web.StreamResponse:
    body, client_wants_usage = _upstream_body(adm)
    meter = StreamMeter(adm.grant.model, adm.estimate.prompt_tokens)
    adm.upstream_started = time.perf_counter()
    upstream_headers: dict[str, str] = {}
    upstream = adm.provider.stream(adm.call.endpoint, body, request_id=adm.call.request_id, headers_out=upstream_headers)
    try:
        first = await anext(upstream)
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        adm.upstream_s = time.perf_counter() - adm.upstream_started
        err = exc if isinstance(exc, GatewayError) else GatewayError("request cancelled", code="cancelled")
        await shielded(deps, fail(deps, adm, err, meter.final_usage()))
        raise
    ttft_us = int((time.perf_counter() - adm.upstream_started) * 1e6)
    headers = {
        **upstream_headers, "content-type": "text/event-stream", "cache-control": "no-cache",
        "x-request-id": request[REQUEST_ID], **cost_headers(adm, None, adm.admission.budget_left_nanos),
    }
    response = web.StreamResponse(headers=headers)
    payloads: list[bytes] = []
    try:
        # Inside the try: a client gone before the headers go out is settled like one gone later.
        await response.prepare(request)
        await _pump(deps, response, adm, meter, first, upstream, payloads, client_wants_usage)
    except CLIENT_GONE:
        await upstream.aclose()
        adm.upstream_s = time.perf_counter() - adm.upstream_started
        gone = GatewayError("client disconnected mid-stream", code="client_disconnected", status=499)
        await shielded(deps, fail(deps, adm, gone, meter.final_usage(), chunks=meter.chunks, body=b"\n".join(payloads)))
        raise
    except GatewayError as exc:
        await upstream.aclose()
        adm.upstream_s = time.perf_counter() - adm.upstream_started
        await shielded(deps, fail(deps, adm, exc, meter.final_usage(), chunks=meter.chunks, body=b"\n".join(payloads)))
        await _send_error(response, exc)
        return response
    adm.upstream_s = time.perf_counter() - adm.upstream_started
    cost, _ = await shielded(deps, finish(
        deps, adm, meter.final_usage(), Kind.STREAM, b"\n".join(payloads),
        chunks=len(payloads), ttft_us=ttft_us, usage_from="upstream" if meter.usage else "counted",
    ))
    # SSE comment lines are ignored by clients; this one carries the settled cost.
    tail = b": abc-cost-usd " + cost_headers(adm, cost, -1)["x-abc-cost-usd"].encode() + b"\n\n" + DONE
    record = adm.call.idempotency_record
    if record is not None:
        sent = b"".join(b"data: " + p + b"\n\n" for p in payloads) + tail
        await shielded(deps, idempotency.remember(deps.redis, record, idempotency.Stored(200, headers, sent)))
    try:
        await response.write(tail)
        await response.write_eof()
    except ConnectionResetError:
        pass  # settled and journaled already; nothing more is owed to a gone client
    return response


def _without_usage(payload: bytes, chunk: dict[str, Any]) -> bytes:
    """The chunk without the `usage` key we asked for, as the client would have had it.

    Upstreams send compact JSON with `"usage":null` on every chunk once asked; cutting
    those bytes out spares a re-serialisation per chunk. A quote inside a JSON string
    is escaped, so the pattern can only be a key; anything unusual is re-serialised.
    """
    if chunk.get("usage") is None and payload.count(_NULL_USAGE) == 1:
        return payload.replace(_NULL_USAGE, b"")
    return orjson.dumps({k: v for k, v in chunk.items() if k != "usage"})


async def _pump(
    deps: Deps, response: web.StreamResponse, adm: Admitted, meter: StreamMeter, first: bytes | None,
    upstream: AsyncGenerator[bytes, None], payloads: list[bytes], client_wants_usage: bool,
) -> None:
    payload = first
    plugin_states: dict[str, dict[str, Any]] = {}
    while payload is not None:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamError("upstream sent a malformed stream chunk") from None
        if not isinstance(chunk, dict):
            raise UpstreamError("upstream sent a malformed stream chunk")
        usage_only = meter.observe(chunk)
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                policy.check_output(adm.assembly, adm.grant, policy.tool_call_names(delta))
        if deps.plugins and not usage_only:
            rewritten = plugins.run_chunk(deps.plugins, chunk, plugin_states)
            if rewritten is not None:
                chunk, payload = rewritten, orjson.dumps(rewritten)
        if usage_only and not client_wants_usage:
            pass  # we asked for it for billing; the client did not
        else:
            if not client_wants_usage and "usage" in chunk:
                payload = _without_usage(payload, chunk)
            payloads.append(payload)
            await response.write(b"data: " + payload + b"\n\n")
        payload = await anext(upstream, None)


async def _send_error(response: web.StreamResponse, exc: GatewayError) -> None:
    try:
        await response.write(b"data: " + exc.to_json() + b"\n\n" + DONE)
        await response.write_eof()
    except ConnectionResetError:
        pass
