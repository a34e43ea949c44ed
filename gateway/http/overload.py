"""Overload protection: caps on requests in flight and on open connections, and refused
compressed bodies. Past a cap the answer is an immediate 503 with Retry-After, so nothing
queues without bound and the process recovers as soon as the burst ends.

The in-flight cap is a middleware (health, readiness and metrics stay reachable); the
connection cap sits in the listening socket's protocol factory, before any byte is parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.errors import InvalidRequest, Overloaded
from gateway.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNCOUNTED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(slots=True)
class Gate:
    """Requests in flight in this process against the cap; one event loop, so no lock."""

    cap: int
    retry_after_s: int
    metrics: Metrics
    inside: int = 0


GATE = web.AppKey("overload_gate", Gate)


@web.middleware
async def overload_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in UNCOUNTED_PATHS:
        return await handler(request)
    gate = request.app[GATE]
    if gate.inside >= gate.cap:
        gate.metrics.observe_overload("request")
        raise Overloaded(f"over {gate.cap} requests in flight; retry shortly", extra={"retry_after_s": gate.retry_after_s})
    gate.inside += 1
    try:
        return await handler(request)
    finally:
        gate.inside -= 1


class UnsupportedEncoding(InvalidRequest):
    status = 415
    code = "unsupported_content_encoding"


def refuse_encoded_body(request: web.Request) -> None:
    """Compressed bodies are refused (415), never inflated: a few KiB of gzip can be GiBs."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedEncoding("compressed request bodies are not accepted; send plain JSON")


def _refusal(retry_after_s: int) -> bytes:
    body = b'{"error":{"message":"too many open connections; retry shortly","type":"server_error","param":null,"code":"overloaded"}}'
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refuse(asyncio.Protocol):
    """A connection over the cap: answer 503 at once, close, read nothing."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.answer)
        transport.close()


class CappedSite(web.TCPSite):
    """A TCPSite whose protocol factory refuses connections past `max_connections`.

    aiohttp has no connection cap of its own; this re-does TCPSite.start (a few lines,
    over its private fields) with a factory that counts the server's live connections.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 retry_after_s: int, metrics: Metrics | None, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._cap = max_connections
        self._answer = _refusal(retry_after_s)
        self._metrics = metrics

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            if len(server.connections) >= self._cap:
                if self._metrics is not None:
                    self._metrics.observe_overload("connection")
                return _Refuse(self._answer)
            handler: asyncio.Protocol = server()
            return handler

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
