"""Answering a call made in another dialect (Responses, Messages) once the spine admitted it.

The upstream is asked natively when it speaks the dialect (see `dialects.speaks`), else in
chat form and the answer translated. Either way the output PEP runs on what the upstream
said, usage is settled at the frozen price by the spine's `finish`/`fail`, and the journal
keeps the answer as the client got it, so a recorded replay returns it byte for byte.
Streams are typed SSE events (`event: <type>`); the last one goes out after settlement.
TODO(exchange): fold into gateway/pipeline/exchange.py when it lands: the provider call,
the output checks and settlement here mirror spine.complete and http/sse.relay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway import plugins
from gateway.deps import Deps
from gateway.errors import CapabilityDenied, GatewayError, UpstreamError
from gateway.journal.events import Kind
from gateway.pipeline import idempotency, policy
from gateway.pipeline.dialects import Dialect, NativeMeter, StreamTranslator, passes_through
from gateway.pipeline.spine import Admitted, cost_headers, fail, finish, shielded
from gateway.pipeline.usage import StreamMeter, Usage, reply_usage
from gateway.providers.base import Endpoint
from gateway.tokenizer import count_text
from gateway.translate.common import Tokens, chat_tokens, sse_event

CLIENT_GONE = (ConnectionResetError, asyncio.CancelledError)
# After settling: e.g. index a stored response. Runs under the same shield as the settlement.
AfterSettle = Callable[[Admitted, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Turn:
    """One dialect call as the route hands it over."""

    dialect: Dialect
    history: list[dict[str, Any]]  # earlier items of a Responses conversation, else []
    extra: dict[str, Any]  # journal fields for the answer's entry
    after: AfterSettle | None = None


def _usage(tokens: Tokens | None, adm: Admitted, text: str) -> Usage:
    if tokens is not None:
        return Usage(tokens.prompt, tokens.completion)
    return Usage(adm.estimate.prompt_tokens, count_text(text, adm.grant.model.encoding))


async def _native(deps: Deps, adm: Admitted, turn: Turn) -> bool:
    try:
        return passes_through(adm.provider, turn.dialect.endpoint, plugins=bool(deps.plugins))
    except GatewayError as exc:
        await shielded(deps, fail(deps, adm, exc, Usage(0, 0)))
        raise


async def send(deps: Deps, adm: Admitted, turn: Turn) -> web.Response:
    native = await _native(deps, adm, turn)
    endpoint, body = (turn.dialect.endpoint, turn.dialect.native_body(adm.call.body, adm.grant, turn.history)) \
        if native else (Endpoint.CHAT, adm.grant.body)
    adm.upstream_started = time.perf_counter()
    try:
        reply = await adm.provider.send(endpoint, body, request_id=adm.call.request_id)
    except GatewayError as exc:
        adm.upstream_s = time.perf_counter() - adm.upstream_started
        await shielded(deps, fail(deps, adm, exc, Usage(0, 0)))
        raise
    except BaseException:
        await shielded(deps, fail(deps, adm, GatewayError("request cancelled", code="cancelled"), Usage(0, 0)))
        raise
    adm.upstream_s = time.perf_counter() - adm.upstream_started
    usage = Usage(0, 0)
    try:
        if native:
            usage = _usage(turn.dialect.tokens(reply.data), adm, turn.dialect.output_text(reply.data))
            policy.check_output(adm.assembly, adm.grant, turn.dialect.tool_names(reply.data))
            answer = reply.body  # as the upstream (or the recording) said it, byte for byte
        else:
            usage = reply_usage(reply.data, adm.estimate.prompt_tokens, adm.grant.model)
            for choice in reply.data.get("choices") or []:
                message = choice.get("message") if isinstance(choice, dict) else None
                if isinstance(message, dict):
                    policy.check_output(adm.assembly, adm.grant, policy.tool_call_names(message))
            data = (plugins.run_response(deps.plugins, reply.data) if deps.plugins else None) or reply.data
            seed = f"{adm.call.request_id}|{data.get('id', '')}"
            answer = orjson.dumps(turn.dialect.from_chat(data, adm.call.body, seed))
    except CapabilityDenied as exc:
        await shielded(deps, fail(deps, adm, exc, usage))
        raise
    except (AttributeError, TypeError, ValueError, KeyError):
        # A 200 the translation can't read is the upstream's fault: 502, settled for what it said.
        err = UpstreamError("upstream answered with a malformed body")
        await shielded(deps, fail(deps, adm, err, usage))
        raise err from None
    return await shielded(deps, _settle_answer(deps, adm, turn, usage, answer, reply.headers))


async def _settle_answer(deps: Deps, adm: Admitted, turn: Turn, usage: Usage, body: bytes, upstream: dict[str, str]) -> web.Response:
    cost, left = await finish(deps, adm, usage, Kind.RESPONSE, body, **turn.extra)
    if turn.after is not None:
        await turn.after(adm, body)
    headers = {**upstream, **cost_headers(adm, cost, left)}
    record = adm.call.idempotency_record
    if record is not None:
        sent = {"content-type": "application/json", "x-request-id": adm.call.request_id, **headers}
        await idempotency.remember(deps.redis, record, idempotency.Stored(200, sent, body))
    return web.Response(body=body, content_type="application/json", headers=headers)


class _Relay:
    """One streamed dialect call: events out as they come, payloads kept for the journal."""

    def __init__(self, response: web.StreamResponse, adm: Admitted, turn: Turn) -> None:
        self.response, self.adm, self.turn = response, adm, turn
        self.payloads: list[bytes] = []  # written to the client
        self.tail: list[bytes] = []  # the last events: written once the call is settled

    async def emit(self, event: dict[str, Any]) -> None:
        payload = orjson.dumps(event)
        self.payloads.append(payload)
        await self.response.write(sse_event(payload, str(event["type"])))

    async def native(self, first: bytes | None, upstream: AsyncGenerator[bytes, None], meter: NativeMeter) -> Tokens | None:
        payload = first
        while payload is not None:
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise UpstreamError("upstream sent a malformed stream event") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise UpstreamError("upstream sent a malformed stream event")
            policy.check_output(self.adm.assembly, self.adm.grant, meter.observe(event))
            if meter.complete:
                self.tail.append(payload)
            else:  # as the upstream sent it, not re-serialised
                self.payloads.append(payload)
                await self.response.write(sse_event(payload, event["type"]))
            payload = await anext(upstream, None)
        if not meter.complete:
            raise UpstreamError("upstream stream ended early")
        return meter.usage

    async def translated(self, deps: Deps, first: bytes | None, upstream: AsyncGenerator[bytes, None],
                         meter: StreamMeter, translator: StreamTranslator) -> Tokens | None:
        for event in translator.start():
            await self.emit(event)
        tokens: Tokens | None = None
        states: dict[str, dict[str, Any]] = {}
        payload = first
        while payload is not None:
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise UpstreamError("upstream sent a malformed stream chunk") from None
            if not isinstance(chunk, dict):
                raise UpstreamError("upstream sent a malformed stream chunk")
            usage_only = meter.observe(chunk)
            tokens = chat_tokens(chunk.get("usage")) or tokens
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict):
                    policy.check_output(self.adm.assembly, self.adm.grant, policy.tool_call_names(delta))
            if deps.plugins and not usage_only:
                chunk = plugins.run_chunk(deps.plugins, chunk, states) or chunk
            for event in translator.feed(chunk):
                await self.emit(event)
            payload = await anext(upstream, None)
        return tokens


async def relay(request: web.Request, deps: Deps, adm: Admitted, turn: Turn) -> web.StreamResponse:
    native = await _native(deps, adm, turn)
    if native:
        endpoint, body = turn.dialect.endpoint, turn.dialect.native_body(adm.call.body, adm.grant, turn.history)
    else:
        options = adm.grant.body.get("stream_options")
        endpoint = Endpoint.CHAT
        body = {**adm.grant.body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
    meter = StreamMeter(adm.grant.model, adm.estimate.prompt_tokens)
    native_meter = turn.dialect.meter()
    upstream_headers: dict[str, str] = {}
    adm.upstream_started = time.perf_counter()
    upstream = adm.provider.stream(endpoint, body, request_id=adm.call.request_id, headers_out=upstream_headers)
    try:
        first = await anext(upstream)
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        adm.upstream_s = time.perf_counter() - adm.upstream_started
        err = exc if isinstance(exc, GatewayError) else GatewayError("request cancelled", code="cancelled")
        await shielded(deps, fail(deps, adm, err, Usage(0, 0)))
        raise
    headers = {**upstream_headers, "content-type": "text/event-stream", "cache-control": "no-cache",
               "x-request-id": adm.call.request_id, **cost_headers(adm, None, adm.admission.budget_left_nanos)}
    response = web.StreamResponse(headers=headers)
    out = _Relay(response, adm, turn)

    def counted() -> Usage:
        if native:
            return _usage(native_meter.usage, adm, "".join(native_meter.text))
        return meter.final_usage()

    try:
        await response.prepare(request)
        if native:
            tokens = await out.native(first, upstream, native_meter)
        else:
            seed = f"{adm.call.request_id}|{_chunk_id(first)}"
            translator = turn.dialect.translator(adm.call.body, seed, str(adm.grant.body.get("model", "")))
            tokens = await out.translated(deps, first, upstream, meter, translator)
            usage = meter.final_usage()
            closing = translator.finish(tokens or Tokens(usage.prompt_tokens, usage.completion_tokens))
            out.tail = [orjson.dumps(event) for event in closing]
    except CLIENT_GONE:
        await upstream.aclose()
        adm.upstream_s = time.perf_counter() - adm.upstream_started
        gone = GatewayError("client disconnected mid-stream", code="client_disconnected", status=499)
        await shielded(deps, fail(deps, adm, gone, counted(), chunks=len(out.payloads), body=b"\n".join(out.payloads)))
        raise
    except GatewayError as exc:
        await upstream.aclose()
        adm.upstream_s = time.perf_counter() - adm.upstream_started
        await shielded(deps, fail(deps, adm, exc, counted(), chunks=len(out.payloads), body=b"\n".join(out.payloads)))
        await _end(response, sse_event(orjson.dumps(turn.dialect.error_event(exc, len(out.payloads))), "error"))
        return response
    adm.upstream_s = time.perf_counter() - adm.upstream_started
    usage = _usage(tokens, adm, "") if tokens is not None else counted()
    all_payloads = out.payloads + out.tail
    await shielded(deps, _settle_stream(deps, adm, turn, usage, all_payloads))
    tail = b"".join(sse_event(p, _type(p)) for p in out.tail)
    record = adm.call.idempotency_record
    if record is not None:
        sent = b"".join(sse_event(p, _type(p)) for p in all_payloads)
        await shielded(deps, idempotency.remember(deps.redis, record, idempotency.Stored(200, headers, sent)))
    await _end(response, tail)
    return response


async def _settle_stream(deps: Deps, adm: Admitted, turn: Turn, usage: Usage, payloads: list[bytes]) -> None:
    body = b"\n".join(payloads)
    await finish(deps, adm, usage, Kind.STREAM, body, chunks=len(payloads), **turn.extra)
    if turn.after is not None:
        await turn.after(adm, body)


def _chunk_id(payload: bytes | None) -> str:
    try:
        chunk = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        return ""
    return str(chunk.get("id", "")) if isinstance(chunk, dict) else ""


def _type(payload: bytes) -> str:
    event = orjson.loads(payload)
    return str(event.get("type", "message")) if isinstance(event, dict) else "message"


async def _end(response: web.StreamResponse, tail: bytes) -> None:
    try:
        await response.write(tail)
        await response.write_eof()
    except ConnectionResetError:
        pass  # settled and journaled already; nothing more is owed to a gone client
