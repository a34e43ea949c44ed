"""A fast mock OpenAI upstream for the benchmark: fixed answers, precomputed bytes.

Run as `python -m bench.mock_upstream --port P [--delay-ms D]`. It must stay far
cheaper than any gateway in front of it, so every response body is built once at
start and each request only parses enough JSON to pick the response shape.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
import uvloop
from aiohttp import web

ANSWER_WORDS = 20  # content chunks in a streamed answer, as a short real answer has
PROMPT_TOKENS = 24
EMBEDDING_DIM = 1536  # text-embedding-3-small's size, so the body weighs what a real one does
CREATED = 1_700_000_000
MODEL = "gpt-4o-mini-2024-07-18"

_WORDS = [f"word{i}" for i in range(ANSWER_WORDS)]
ANSWER = " ".join(_WORDS)
USAGE = {
    "prompt_tokens": PROMPT_TOKENS,
    "completion_tokens": ANSWER_WORDS,
    "total_tokens": PROMPT_TOKENS + ANSWER_WORDS,
}


def _chat_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": USAGE,
        }
    )


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(delta: dict[str, object], finish: str | None, usage: bool) -> dict[str, object]:
    chunk: dict[str, object] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage:
        # With include_usage, OpenAI sends `usage: null` on every chunk but the last.
        chunk["usage"] = None
    return chunk


def _stream_events(include_usage: bool) -> list[bytes]:
    events = [_sse(_chunk({"role": "assistant", "content": ""}, None, include_usage))]
    for i, word in enumerate(_WORDS):
        text = word if i == 0 else " " + word
        events.append(_sse(_chunk({"content": text}, None, include_usage)))
    events.append(_sse(_chunk({}, "stop", include_usage)))
    if include_usage:
        events.append(
            _sse(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion.chunk",
                    "created": CREATED,
                    "model": MODEL,
                    "choices": [],
                    "usage": USAGE,
                }
            )
        )
    events.append(b"data: [DONE]\n\n")
    return events


def _embedding_body() -> bytes:
    vector = [round(((i * 37) % 1000) / 1000.0 - 0.5, 6) for i in range(EMBEDDING_DIM)]
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 9, "total_tokens": 9},
        }
    )


class MockUpstream:
    def __init__(self, *, delay_ms: float, chunk_delay_ms: float) -> None:
        self.delay_s = delay_ms / 1000.0
        self.chunk_delay_s = chunk_delay_ms / 1000.0
        self.chat = _chat_body()
        self.stream_plain = _stream_events(include_usage=False)
        self.stream_usage = _stream_events(include_usage=True)
        self.embedding = _embedding_body()
        self.models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": CREATED, "owned_by": "bench"}
                    for m in ("gpt-4o-mini", "text-embedding-3-small")
                ],
            }
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not body.get("stream"):
            return web.Response(body=self.chat, content_type="application/json")
        options = body.get("stream_options") or {}
        events = self.stream_usage if options.get("include_usage") else self.stream_plain
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await response.prepare(request)
            for event in events:
                # One write per event, as a real upstream flushes each token as it comes.
                await response.write(event)
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
            await response.write_eof()
        except ConnectionResetError:
            # The load driver hangs up on streams in flight when its time is up.
            pass
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(body=self.embedding, content_type="application/json")

    async def list_models(self, request: web.Request) -> web.Response:
        return web.Response(body=self.models, content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def build_app(mock: MockUpstream) -> web.Application:
    app = web.Application()
    # Both with and without /v1: clients differ on whether the base URL carries it.
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", mock.chat_completions)
        app.router.add_post(f"{prefix}/embeddings", mock.embeddings)
        app.router.add_get(f"{prefix}/models", mock.list_models)
    app.router.add_get("/health", mock.health)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mock OpenAI upstream for the benchmark")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before answering")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="wait between streamed chunks"
    )
    args = parser.parse_args(argv)
    mock = MockUpstream(delay_ms=args.delay_ms, chunk_delay_ms=args.chunk_delay_ms)
    started = time.monotonic()
    web.run_app(
        build_app(mock),
        host=args.host,
        port=args.port,
        access_log=None,  # a log line per request would cost more than the answer itself
        shutdown_timeout=1.0,
        loop=uvloop.new_event_loop(),
        print=lambda _msg: print(f"mock upstream ready in {time.monotonic() - started:.2f}s"),
    )


if __name__ == "__main__":
    main()
