"""The hot path's round trips to a single Redis: pipelined, callers sharing connections.

Every admitted request makes two round trips (reserve, settle), each a script plus a few
index writes. Redis answers a connection's commands in the order they came, so callers
need not take turns on a connection: each exchange is written as soon as it is ready,
behind whatever is in flight, and its replies are the next ones hiredis parses off the
connection. There is no checkout and no reader task: a connection is an
`asyncio.Protocol` whose `data_received` feeds hiredis and completes each waiting
exchange's future once its replies are in, and the exchanges written in one turn of the
event loop go out in one system call. At 32 concurrent requests that is a few exchanges
per read and per write, where a connection per exchange (redis-py's pipeline on its
pool) made a task, a stream reader, a timer and two system calls each.

redis-py still opens each connection (address, auth, TLS, db, its handshake) and then
hands over the transport; its error types and reply parsing are the same. A connection
that misses a deadline or sees any error is closed, and every exchange waiting on it
fails: nobody ever reads a reply that was meant for someone else. Redis Cluster does not
come through here: its client routes each command by slot.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis import exceptions as rx
from redis._parsers.base import BaseParser
from redis.asyncio import ConnectionPool, Redis

__all__ = ["Wire"]

DEFAULT_TIMEOUT_S = 1.0  # a pool configured without a socket timeout still gets a deadline
# Connections an instance opens at most. One carries any number of exchanges; a few more
# keep a caller's WAIT (replication acknowledgement) from holding up everyone behind it.
MAX_PIPES = 4
_MORE = object()  # hiredis: no whole reply in the buffer yet


class Wire:
    """Up to `max_connections` (at most MAX_PIPES) pipelined connections of `pool`'s kind."""

    def __init__(self, pool: ConnectionPool, *, max_connections: int, timeout_s: float) -> None:
        # The pool's own settings (address, auth, TLS, db), but no per-read timer: each
        # exchange has its own deadline.
        self._kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection_class = pool.connection_class
        self._max = max(1, min(max_connections, MAX_PIPES))
        self.timeout_s = timeout_s
        self._pipes: list[_Pipe] = []
        self._opening = 0  # connections being opened
        self._waiting_for_open: list[asyncio.Future[None]] = []

    @classmethod
    def of(cls, redis: Redis) -> Wire | None:
        """A wire beside `redis`'s own pool, with its limits; None for a cluster client."""
        pool = getattr(redis, "connection_pool", None)
        if not isinstance(pool, ConnectionPool):
            return None
        timeout = pool.connection_kwargs.get("socket_timeout") or DEFAULT_TIMEOUT_S
        return cls(pool, max_connections=pool.max_connections, timeout_s=timeout)

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Each command's reply, in order; a Redis error reply is returned, not raised.
        Connection trouble raises redis-py's ConnectionError, a missed deadline TimeoutError."""
        packed = b"".join([hiredis.pack_command(tuple(command)) for command in commands])
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        pipe, opened_before = await self._choose(deadline)
        try:
            return await pipe.exchange(packed, len(commands), deadline)
        except rx.ConnectionError:
            if not opened_before:
                raise
        # A connection opened earlier broke under this exchange (a Redis restart that the
        # loop had not noticed yet): once more, on a new one.
        return await (await self._open(deadline)).exchange(packed, len(commands), deadline)

    async def close(self) -> None:
        """Close every connection; exchanges still waiting on them fail."""
        for pipe in list(self._pipes):
            pipe.abort(rx.ConnectionError("the gateway closed its Redis connection"))

    async def _choose(self, deadline: float) -> tuple[_Pipe, bool]:
        """A connection for one exchange, and whether it was open before: an idle one, else
        a new one while the cap allows, else the one with the fewest exchanges in flight."""
        while True:
            best = min(self._pipes, key=lambda pipe: len(pipe.waiting), default=None)
            may_open = len(self._pipes) + self._opening < self._max
            if best is not None and not (best.waiting and may_open):
                return best, True
            if may_open:
                return await self._open(deadline), False
            # Every connection there may be is being opened: wait for one of them.
            opened = asyncio.get_running_loop().create_future()
            self._waiting_for_open.append(opened)
            async with asyncio.timeout_at(deadline):
                await opened

    async def _open(self, deadline: float) -> _Pipe:
        self._opening += 1
        conn = self._connection_class(**self._kwargs)
        try:
            async with asyncio.timeout_at(deadline):
                await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            self._opening -= 1
            waiters, self._waiting_for_open = self._waiting_for_open, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        opened: Any = conn  # its stream is redis-py's own, not typed as public
        writer: asyncio.StreamWriter = opened._writer
        # The transport is the pipe's from here. redis-py's object would close it when it is
        # collected; asyncio's StreamWriter too, so the pipe keeps that one until it closes.
        opened._writer = opened._reader = None
        pipe = _Pipe(self._pipes, writer)
        transport = writer.transport
        transport.set_protocol(pipe)
        pipe.connection_made(transport)
        return pipe


class _Exchange:
    __slots__ = ("future", "expected", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int) -> None:
        self.future = future
        self.expected = expected
        self.replies: list[Any] = []


class _Pipe(asyncio.Protocol):
    """One connection: exchanges answered in the order they were written."""

    def __init__(self, pipes: list[_Pipe], writer: asyncio.StreamWriter) -> None:
        self._pipes = pipes
        self._writer: asyncio.StreamWriter | None = writer  # see Wire._open
        self._transport: asyncio.Transport | None = None
        # Error replies come back as redis-py's exception instances (NoScriptError, ...).
        self._parser = hiredis.Reader(
            protocolError=rx.InvalidResponse, replyError=BaseParser.parse_error, notEnoughData=_MORE,
        )
        self.waiting: collections.deque[_Exchange] = collections.deque()
        self._out: list[bytes] = []  # exchanges written in this turn of the loop, not sent yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's
        self._pipes.append(self)

    async def exchange(self, packed: bytes, replies: int, deadline: float) -> list[Any]:
        if self._transport is None:
            raise rx.ConnectionError("Redis closed the connection")
        loop = asyncio.get_running_loop()
        waiting = _Exchange(loop.create_future(), replies)
        self.waiting.append(waiting)
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(packed)
        timer = loop.call_at(deadline, self._expire, waiting)
        try:
            return await waiting.future
        finally:
            timer.cancel()

    def data_received(self, data: bytes) -> None:
        parser, waiting = self._parser, self.waiting
        parser.feed(data)
        while (reply := parser.gets()) is not _MORE:
            if not waiting:
                self.abort(rx.InvalidResponse("Redis sent a reply nobody asked for"))
                return
            if isinstance(reply, rx.ConnectionError):  # e.g. LOADING: the server is not serving
                self.abort(reply)
                return
            head = waiting[0]
            head.replies.append(reply)
            if len(head.replies) == head.expected:
                waiting.popleft()
                if not head.future.done():  # its caller may have given up (cancelled)
                    head.future.set_result(head.replies)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None:
            self._transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rx.ConnectionError("Redis closed the connection"))

    def abort(self, error: Exception) -> None:
        """Close the connection now; every exchange waiting on it fails with `error`."""
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows, with nobody left waiting
        self._fail(error)

    def _expire(self, exchange: _Exchange) -> None:
        if not exchange.future.done():
            # Everyone behind it waits on the same stalled server, and may have been run
            # already: a timeout for all (never retried), not a broken connection.
            self.abort(TimeoutError("Redis did not answer in time"))

    def _fail(self, error: Exception) -> None:
        self._transport = self._writer = None
        if self in self._pipes:
            self._pipes.remove(self)
        while self.waiting:
            waiting = self.waiting.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(error)
