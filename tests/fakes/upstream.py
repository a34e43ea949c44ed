"""A scripted fake OpenAI upstream over real HTTP (aiohttp on 127.0.0.1, a free port).

Each request pops the next scripted answer (`respond_with`, `stream_with`); with none
queued it answers like a tiny deterministic OpenAI (echo chat/completions, embeddings),
and natively in the Responses API (`/responses`) and Anthropic's Messages (`/messages`,
keyed by `x-api-key`): pretty-printed JSON bodies and `event:`-typed streams, as those
upstreams send them, so a pass-through can be checked byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

CREATED = 1_700_000_000


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    json: Any  # None when the body is not JSON
    peer: tuple[str, int] | None = None  # client address: the same port twice means keep-alive
    query: str = ""


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    status: int = 200
    json: Any = None
    body: bytes | None = None  # raw bytes win over `json`, for garbage answers
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the status line: what a slow upstream looks like
    reset: bool = False  # close the connection instead of answering


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    chunks: Sequence[dict[str, Any] | str]  # dicts become `data: {json}\n\n`; strings go raw
    include_done: bool = True
    delay_s: float = 0.0  # before each chunk
    drop_after: int | None = None  # close the socket after this many chunks, mid-body
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


Answer = JsonAnswer | StreamAnswer


class FakeUpstream:
    """`async with FakeUpstream() as fake:` then point a provider at `fake.base_url`."""

    def __init__(self, *, api_key: str | None = None) -> None:
        # With a key set, requests without the matching bearer get OpenAI's 401.
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.streams_completed = 0
        # Streams the client abandoned: a write failed or aiohttp cancelled the handler.
        self.disconnects = 0
        self.disconnected = asyncio.Event()
        self._script: deque[Answer] = deque()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client hanging up cancels the handler, which is how we see it.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def respond_with(
        self,
        *,
        status: int = 200,
        json: Any = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
        times: int = 1,
        reset: bool = False,
    ) -> None:
        answer = JsonAnswer(status, json, body, dict(headers or {}), delay_s, reset)
        self._script.extend([answer] * times)

    def stream_with(
        self,
        chunks: Sequence[dict[str, Any] | str],
        *,
        include_done: bool = True,
        delay_s: float = 0.0,
        drop_after: int | None = None,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        times: int = 1,
    ) -> None:
        answer = StreamAnswer(
            list(chunks), include_done, delay_s, drop_after, status, dict(headers or {})
        )
        self._script.extend([answer] * times)

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    async def wait_disconnect(self, timeout: float = 2.0) -> bool:
        try:
            await asyncio.wait_for(self.disconnected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        peername = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path,
                CIMultiDict(request.headers),
                raw,
                parsed,
                tuple(peername[:2]) if peername else None,
                request.query_string,
            )
        )
        anthropic = request.path.endswith("/messages")
        offered = request.headers.get("x-api-key") if anthropic else request.headers.get("Authorization")
        if self.api_key is not None and offered != (self.api_key if anthropic else f"Bearer {self.api_key}"):
            return _json(401, _error("Incorrect API key provided", "invalid_api_key"))
        answer = self._script.popleft() if self._script else default_answer(request, parsed)
        if isinstance(answer, StreamAnswer):
            return await self._stream(request, answer)
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        if answer.reset:
            _drop(request)
            return web.Response()
        if answer.body is not None:
            return web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        return _json(answer.status, answer.json, answer.headers)

    async def _stream(self, request: web.Request, answer: StreamAnswer) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=answer.status,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        resp.headers.update(answer.headers)
        try:
            await resp.prepare(request)
            for i, chunk in enumerate(answer.chunks):
                if answer.drop_after is not None and i >= answer.drop_after:
                    _drop(request)
                    return resp
                if answer.delay_s:
                    await asyncio.sleep(answer.delay_s)
                await resp.write(_sse(chunk))
            if answer.include_done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            self.disconnected.set()
            raise
        self.streams_completed += 1
        return resp


def _drop(request: web.Request) -> None:
    # Close the socket with the chunked body unfinished: the client sees a truncated stream.
    if request.transport is not None:
        request.transport.close()


def _sse(chunk: dict[str, Any] | str) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode()
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _json(status: int, data: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data),
        content_type="application/json",
        headers=headers,
    )


def _error(message: str, code: str, *, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def count_tokens(text: str) -> int:
    """The fake's tokenizer: whitespace words. Deterministic, so tests can predict usage."""
    return len(text.split())


def default_answer(request: web.Request, body: Any) -> Answer:
    """What the fake says when nothing is scripted: an echo with usage, like a tiny OpenAI."""
    body = body if isinstance(body, dict) else {}
    path = request.path.removeprefix("/v1")
    if request.method == "GET" and path == "/models":
        return JsonAnswer(json={"object": "list", "data": [_model("fake-model")]})
    if request.method == "POST" and path == "/chat/completions":
        return _chat(body)
    if request.method == "POST" and path == "/completions":
        return _completion(body)
    if request.method == "POST" and path == "/embeddings":
        return JsonAnswer(json=_embeddings(body))
    if request.method == "POST" and path in ("/responses", "/messages"):
        return native_answer(path, body)
    return JsonAnswer(status=404, json=_error(f"no route {request.path}", "unknown_url"))


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and value > 0 else default


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": "fake"}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _reply_words(prompt_text: str, body: dict[str, Any]) -> tuple[list[str], str]:
    """The echo's words, cut at max_tokens, and the finish_reason that cut implies."""
    words = ("echo: " + prompt_text).split()
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _chat(body: dict[str, Any]) -> Answer:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    prompt = sum(count_tokens(_text_of(m.get("content"))) for m in messages)
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    words, finish = _reply_words(_text_of(last_user.get("content")), body)
    model = body.get("model", "fake-model")
    n = _int_or(body.get("n"), 1)
    usage = _usage(prompt, len(words) * n)
    head = {"id": "chatcmpl-fake", "created": CREATED, "model": model}
    if not body.get("stream"):
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": " ".join(words)},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i in range(n)
        ]
        completion = {**head, "object": "chat.completion", "choices": choices, "usage": usage}
        return JsonAnswer(json=completion)
    head = {**head, "object": "chat.completion.chunk"}
    chunks: list[dict[str, Any] | str] = []
    for i in range(n):
        chunks.append({**head, "choices": [_delta(i, {"role": "assistant", "content": ""})]})
        for j, word in enumerate(words):
            text = word if j == 0 else " " + word
            chunks.append({**head, "choices": [_delta(i, {"content": text})]})
        chunks.append({**head, "choices": [_delta(i, {}, finish)]})
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**head, "choices": [], "usage": usage})
    return StreamAnswer(chunks)


def _delta(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _completion(body: dict[str, Any]) -> Answer:
    prompt_text = body.get("prompt")
    if isinstance(prompt_text, list):  # strings, token ids or lists of token ids
        prompt_text = " ".join(map(str, prompt_text))
    else:
        prompt_text = str(prompt_text or "")
    words, finish = _reply_words(prompt_text, body)
    usage = _usage(count_tokens(prompt_text), len(words))
    model = body.get("model", "fake-model")
    head = {"id": "cmpl-fake", "object": "text_completion", "created": CREATED, "model": model}
    if not body.get("stream"):
        choice = _text_choice(" ".join(words), finish)
        return JsonAnswer(json={**head, "choices": [choice], "usage": usage})
    chunks: list[dict[str, Any] | str] = [
        {**head, "choices": [_text_choice((" " if j else "") + w, None)]}
        for j, w in enumerate(words)
    ]
    chunks.append({**head, "choices": [_text_choice("", finish)]})
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**head, "choices": [], "usage": usage})
    return StreamAnswer(chunks)


def _text_choice(text: str, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) and not _is_token_list(inputs) else [inputs]
    dims = _int_or(body.get("dimensions"), 8)
    data = []
    tokens = 0
    for i, item in enumerate(items):
        text = item if isinstance(item, str) else " ".join(map(str, item or []))
        tokens += len(item) if isinstance(item, list) else count_tokens(text)
        vector = _vector(text, dims)
        # The openai SDK asks for base64 by default and decodes it.
        if body.get("encoding_format") == "base64":
            embedding: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        else:
            embedding = vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model", "fake-model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def native_answer(path: str, body: dict[str, Any]) -> Answer:
    """What the fake answers to a Responses (`/responses`) or Messages (`/messages`) call."""
    return _native_responses(body) if path == "/responses" else _native_messages(body)


def sent_bytes(answer: Answer) -> bytes:
    """The body bytes the fake sends for `answer` (a stream's frames, [DONE] included if any)."""
    if isinstance(answer, JsonAnswer):
        return answer.body if answer.body is not None else orjson.dumps(answer.json)
    return b"".join(_sse(c) for c in answer.chunks) + (b"data: [DONE]\n\n" if answer.include_done else b"")


def _typed(events: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
    return [f"event: {e['type']}\ndata: {orjson.dumps(e).decode()}\n\n" for e in events]


def _pretty(data: dict[str, Any]) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2)


def _items_text(items: Any) -> str:
    if isinstance(items, str):
        return items
    texts = [_text_of(i.get("content")) or str(i.get("output", "")) for i in items or [] if isinstance(i, dict)]
    return " ".join(texts)


def _native_responses(body: dict[str, Any]) -> Answer:
    """A Response: the echo of the input, or a call of the first function tool offered."""
    prompt = _items_text(body.get("input"))
    words, finish = _reply_words(prompt, {"max_tokens": body.get("max_output_tokens")})
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        item: dict[str, Any] = {"id": "fc_fake", "type": "function_call", "status": "completed", "call_id": "call_fake",
                                "name": tools[0]["name"], "arguments": '{"id": "A-1"}'}
    else:
        text = " ".join(words)
        item = {"id": "msg_fake", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
    usage = {"input_tokens": count_tokens(prompt), "input_tokens_details": {"cached_tokens": 1},
             "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": count_tokens(prompt) + len(words)}
    response = {"id": "resp_fake", "object": "response", "created_at": CREATED, "status": "completed",
                "model": body.get("model"), "output": [item], "usage": usage, "error": None,
                "incomplete_details": None, "instructions": None, "metadata": {}, "parallel_tool_calls": True,
                "temperature": 1.0, "tool_choice": "auto", "tools": body.get("tools", []), "top_p": 1.0}
    if not body.get("stream"):
        return JsonAnswer(body=_pretty(response))
    shell = {**response, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": shell},
                                    {"type": "response.in_progress", "response": shell},
                                    {"type": "response.output_item.added", "output_index": 0,
                                     "item": {**item, "status": "in_progress"} if tools else {**item, "content": []}}]
    if not tools:
        events.append({"type": "response.content_part.added", "item_id": "msg_fake", "output_index": 0,
                       "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})
        events += [{"type": "response.output_text.delta", "item_id": "msg_fake", "output_index": 0,
                    "content_index": 0, "delta": (" " if j else "") + w} for j, w in enumerate(words)]
    events += [{"type": "response.output_item.done", "output_index": 0, "item": item},
               {"type": "response.completed", "response": response}]
    return StreamAnswer(_typed([{**e, "sequence_number": i} for i, e in enumerate(events)]), include_done=False)


def _native_messages(body: dict[str, Any]) -> Answer:
    """An Anthropic Message: the echo of the last user turn, or a use of the first tool offered."""
    turns = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    prompt = " ".join(_text_of(m.get("content")) for m in turns)
    words, finish = _reply_words(_text_of(turns[-1].get("content")) if turns else "", body)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    block: dict[str, Any] = ({"type": "tool_use", "id": "toolu_fake", "name": tools[0]["name"], "input": {"id": "A-1"}}
                             if tools else {"type": "text", "text": " ".join(words)})
    stop = "tool_use" if tools else {"length": "max_tokens"}.get(finish, "end_turn")
    usage = {"input_tokens": count_tokens(prompt), "output_tokens": len(words),
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2}
    message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model"),
               "content": [block], "stop_reason": stop, "stop_sequence": None, "usage": usage}
    if not body.get("stream"):
        return JsonAnswer(body=_pretty(message))
    opener = {**block, "input": {}} if tools else {"type": "text", "text": ""}
    delta = ({"type": "input_json_delta", "partial_json": '{"id": "A-1"}'} if tools
             else {"type": "text_delta", "text": " ".join(words)})
    events = [{"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                     "usage": {**usage, "output_tokens": 1}}},
              {"type": "content_block_start", "index": 0, "content_block": opener},
              {"type": "ping"},
              {"type": "content_block_delta", "index": 0, "delta": delta},
              {"type": "content_block_stop", "index": 0},
              {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
               "usage": {"output_tokens": len(words)}},
              {"type": "message_stop"}]
    return StreamAnswer(_typed(events), include_done=False)


def _is_token_list(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, int) for v in value)


def _vector(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i % len(digest)] / 255.0, 6) for i in range(dims)]


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    """Import this fixture (or list this module in `pytest_plugins`) to get a running fake."""
    async with FakeUpstream() as fake:
        yield fake
