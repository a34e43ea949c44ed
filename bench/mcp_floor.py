"""The floor under a governed tools/call: the same I/O with none of the governance.

An aiohttp app on uvloop (as the gateway serves) that answers the SDK's client at /mcp
and does, per tools/call, only the input and output a gateway cannot skip: parse the
JSON-RPC body, one Redis round trip (on the gateway's own pipelined wire), the upstream
POST (on the gateway's own lean HTTP client, in the session it opened), a second Redis
round trip, and the answer. No token, no Assembly, no schema, no price, no hash chain,
no metrics, no log line. What the gateway spends beyond this is what governing costs;
this is what any Python gateway on this stack spends on this machine before it governs.

Run: python -m bench.mcp_floor --port N --redis-port N --upstream URL
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from typing import Any

import orjson
import uvloop
from aiohttp import web
from redis.asyncio import Redis

from gateway.providers import transport
from gateway.state.wire import Wire

PROTOCOL_VERSION = "2025-11-25"
_JSON_FIRST = "application/json, text/event-stream"


class Floor:
    def __init__(self, redis_port: int, upstream: str) -> None:
        wire = Wire.of(Redis(port=redis_port))
        assert wire is not None
        self.wire = wire
        self.http = transport.Client()
        self.target = transport.Target.parse(upstream)
        self.block = transport.encode_headers({"accept": _JSON_FIRST, "content-type": "application/json"})
        self.ids = itertools.count(1)

    async def open_session(self) -> None:
        """initialize + initialized on the upstream, as the gateway's SDK client does once."""
        hello = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "floor", "version": "1"}}
        response = await self.http.request(self.target, self._message("initialize", hello), self.block, transport.Timeouts())
        session = response.headers.get("mcp-session-id", "")
        await response.read()
        response.release()
        self.block = transport.encode_headers({
            "accept": _JSON_FIRST, "content-type": "application/json",
            "mcp-session-id": session, "mcp-protocol-version": PROTOCOL_VERSION,
        })
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _message(self, method: str, params: Any) -> bytes:
        return orjson.dumps({"jsonrpc": "2.0", "id": f"floor-{next(self.ids)}", "method": method, "params": params})

    async def _post(self, message: dict[str, Any] | bytes) -> dict[str, Any] | None:
        body = message if isinstance(message, bytes) else orjson.dumps(message)
        response = await self.http.request(self.target, body, self.block, transport.Timeouts())
        raw = await response.read()
        response.release()
        return orjson.loads(raw) if raw else None

    async def handle(self, request: web.Request) -> web.Response:
        message = orjson.loads(await request.read())
        method, rid = message.get("method"), message.get("id")
        if rid is None:
            return web.Response(status=202)  # a notification
        if method == "initialize":
            result: Any = {
                "protocolVersion": PROTOCOL_VERSION, "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "floor", "version": "1"},
            }
        elif method == "tools/call":
            await self.wire.execute([("INCRBY", "floor:reserved", 1), ("XADD", "floor:journal", "MAXLEN", "~", 1000, "*", "k", "request")])
            answer = await self._post(self._message("tools/call", message["params"]))
            await self.wire.execute([("INCRBY", "floor:settled", 1), ("XADD", "floor:journal", "MAXLEN", "~", 1000, "*", "k", "answer")])
            result = (answer or {}).get("result")
        else:  # tools/list and the rest: as the upstream answers
            result = ((await self._post(self._message(str(method), message.get("params")))) or {}).get("result")
        body = orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": result})
        return web.Response(body=body, content_type="application/json")


async def serve(port: int, redis_port: int, upstream: str) -> None:
    floor = Floor(redis_port, upstream)
    await floor.open_session()
    app = web.Application()
    app.router.add_post("/mcp", floor.handle)
    app.router.add_get("/", lambda _: web.Response(text="ok"))  # readiness
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.redis_port, args.upstream))
