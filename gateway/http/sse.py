"""Framing an Exchange's stream as Server-Sent Events; no accounting happens here.

Errors before the first payload are ordinary JSON errors (the exchange raises them before
anything is written). After it, an error goes out as a `data: {"error": ...}` event and
`[DONE]`. The exchange settles before the tail goes out, so the tail can carry the cost;
a keyed stream's bytes are kept for retries in that same settle step.
A client that hangs up raises `ClientGone`; leaving the exchange settles it. So does one
that stops reading: a write blocked past `server.stream_write_timeout_s` counts as gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import ClientGone, GatewayError
from gateway.http.keys import STARTED
from gateway.pipeline.exchange import Exchange
from gateway.state import idempotency
from gateway.translate.common import event_type, sse_event

DONE = b"data: [DONE]\n\n"
# Buffered plus new bytes under which a write can't block: a quarter of asyncio's and
# uvloop's default high-water mark for a transport (64 KiB), whatever a write adds.
UNTIMED_BELOW_BYTES = 16 * 1024


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def relay(request: web.Request, ex: Exchange) -> web.StreamResponse:
    """A chat or completions stream: `data:` events, `[DONE]` after the settled cost."""
    return await _relay(
        request, ex, ex.stream(), event,
        error=lambda error, _sent: event(error.to_json()) + DONE,
        tail=lambda cost: _tail(ex, cost),
    )


async def relay_events(
    request: web.Request, ex: Exchange, chunks: AsyncGenerator[bytes, None], error_event: Callable[[GatewayError, int], dict[str, Any]],
) -> web.StreamResponse:
    """A dialect's stream (Responses, Messages) as typed events, `event: <type>` then `data:`.

    Its closing events (`ex.tail`) go out after the exchange settled them; an error after
    the first byte is the dialect's own error event, numbered after the events sent.
    """
    return await _relay(
        request, ex, chunks, _typed,
        error=lambda error, sent: sse_event(orjson.dumps(error_event(error, sent)), "error"),
        tail=lambda _cost: b"".join(_typed(payload) for payload in ex.tail),
    )


async def _relay(
    request: web.Request, ex: Exchange, chunks: AsyncGenerator[bytes, None], frame: Callable[[bytes], bytes], *,
    error: Callable[[GatewayError, int], bytes], tail: Callable[[int], bytes],
) -> web.StreamResponse:
    """Each payload framed and written as it comes. After the first byte, a failure is an
    error event (`error(settled error, events sent)`); the end is `tail(settled cost)`."""
    first = await anext(chunks, None)  # upstream errors before the first byte propagate as JSON
    headers = {
        **ex.answer_headers(None, ex.budget_left_at_admission),
        "content-type": "text/event-stream", "cache-control": "no-cache", "x-request-id": ex.call.request_id,
    }
    response = web.StreamResponse(headers=headers)
    limit_s = ex.deps.settings.server.stream_write_timeout_s
    sent: list[bytes] = []
    try:
        # Inside the try: a client gone before the headers go out is settled like one gone later.
        await response.prepare(request)
        request[STARTED] = response
        if first is not None:
            sent.append(frame(first))
            await _write(request, response, sent[-1], limit_s)
            async for payload in chunks:
                sent.append(frame(payload))
                await _write(request, response, sent[-1], limit_s)
    except ConnectionResetError as gone:
        await chunks.aclose()
        raise ClientGone("client disconnected mid-stream") from gone
    except Exception as exc:  # after the first byte, whatever failed becomes an error event
        await chunks.aclose()
        try:
            failure = (await ex.close(exc)).error
        except GatewayError as unsettled:  # Redis away: the settlement waits for it (ledger backlog)
            failure = unsettled
        assert failure is not None
        await _write_quietly(request, response, error(failure, len(sent)), limit_s)
        return response
    try:
        # Kept in the settle step for retries with the same Idempotency-Key: the bytes sent.
        settled = await ex.close(keep=lambda cost: idempotency.Stored(200, headers, b"".join(sent) + tail(cost)))
    except GatewayError as unsettled:  # as above: the stream ends with the error, not its cost
        await _write_quietly(request, response, error(unsettled, len(sent)), limit_s)
        return response
    await _write_quietly(request, response, tail(settled.cost_nanos), limit_s)
    return response


def _typed(payload: bytes) -> bytes:
    return sse_event(payload, event_type(payload))


def _tail(ex: Exchange, cost: int) -> bytes:
    # SSE comment lines are ignored by clients; this one carries the settled cost.
    return b": abc-cost-usd " + ex.answer_headers(cost, -1)["x-abc-cost-usd"].encode() + b"\n\n" + DONE


async def _write(request: web.Request, response: web.StreamResponse, data: bytes, limit_s: float) -> None:
    """A client that stops reading fills the socket and blocks the write; past the limit it
    counts as gone, so it can't hold a stream, an upstream call and an in-flight slot.

    A write blocks only once the transport's buffer passes its high-water mark (64 KiB);
    well below it the timer is not needed, and it was 14% of a streamed call's instructions
    (`python -m bench.instructions --kind stream`).
    """
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size() + len(data) < UNTIMED_BELOW_BYTES:
        await response.write(data)
        return
    try:
        async with asyncio.timeout(limit_s):
            await response.write(data)
    except TimeoutError:
        raise ConnectionResetError("client stopped reading") from None


async def _write_quietly(request: web.Request, response: web.StreamResponse, data: bytes, limit_s: float) -> None:
    try:
        await _write(request, response, data, limit_s)
        async with asyncio.timeout(limit_s):
            await response.write_eof()
    except (ConnectionResetError, TimeoutError):
        pass  # settled and journaled already; nothing more is owed to a gone client
