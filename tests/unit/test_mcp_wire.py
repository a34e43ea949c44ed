"""The direct tools/call POST against a real HTTP server on loopback: an SSE answer is taken
as soon as its event is in, and its connection still serves the next call."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway.mcp.wire import ToolPost


async def _serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/mcp", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/mcp"


def test_an_sse_answer_is_taken_before_its_stream_ends_and_the_connection_is_kept() -> None:
    async def run() -> None:
        release = asyncio.Event()
        peers: list[Any] = []

        async def handler(request: web.Request) -> web.StreamResponse:
            message = orjson.loads(await request.read())
            peers.append(request.transport.get_extra_info("peername") if request.transport else None)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": "hi"}]}}
            await response.write(b"event: message\r\ndata: " + orjson.dumps(answer) + b"\r\n\r\n")
            await release.wait()  # the stream's end comes only once the caller has its answer
            await response.write_eof()
            return response

        runner, url = await _serve(handler)
        post = ToolPost("t", url, max_bytes=10_000, timeout_s=10)
        post.on_session({}, "session-1", "2025-06-18")
        try:
            first = await asyncio.wait_for(post.call("echo", {"text": "hi"}), timeout=10)
            assert first.data == {"content": [{"type": "text", "text": "hi"}]}
            release.set()
            await asyncio.wait_for(asyncio.gather(*post._finishing), timeout=10)  # the stream read to its end
            second = await asyncio.wait_for(post.call("echo", {"text": "hi"}), timeout=10)
            assert second.data == first.data
            assert len(peers) == 2 and peers[0] == peers[1]  # one connection for both calls
        finally:
            release.set()
            await post.close()
            await runner.cleanup()

    asyncio.run(run())


def test_an_sse_stream_that_ends_without_the_answer_is_an_error_and_a_partial_event_is_not_read() -> None:
    from gateway.mcp.wire import _answer

    answer = {"jsonrpc": "2.0", "id": "abc-1", "result": {}}
    whole = b"data: " + orjson.dumps(answer) + b"\n\n"
    assert _answer(whole, "abc-1", events=True, ended=False) == answer
    assert _answer(whole[:-1], "abc-1", events=True, ended=False) is None  # its blank line not yet in
    assert _answer(whole[:-1], "abc-1", events=True) == answer  # at the end, what came is read
