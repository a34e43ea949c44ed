"""The hot path's round trips to a single Redis: one write, all replies read, one deadline.

Every admitted request makes two round trips (reserve, settle), each a script plus a few
index writes. Through redis-py's `Pipeline` and `BlockingConnectionPool` one of them
costs a pipeline object, a condition variable, a socket peek on checkout, a task for the
write and a timer per reply. Here the same redis-py connections (its hiredis parser,
its error types) are driven directly: the commands packed once, one `writelines`, the
replies read in order under a single deadline for the whole exchange.

A connection that saw any error is closed, never reused, so one that is handed out
never holds a stale reply. Redis Cluster does not come through here: its client routes
each command by slot.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

import hiredis
from redis import exceptions as rx
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection

__all__ = ["Wire"]

DEFAULT_TIMEOUT_S = 1.0  # a pool configured without a socket timeout still gets a deadline


class Wire:
    """At most `max_connections` connections of `pool`'s kind, used one exchange at a time."""

    def __init__(self, pool: ConnectionPool, *, max_connections: int, timeout_s: float) -> None:
        # The pool's own settings (address, auth, TLS, db), but no per-read timer: the
        # deadline covers the exchange as a whole.
        self._kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection_class = pool.connection_class
        self._max = max_connections
        self.timeout_s = timeout_s
        self._idle: list[AbstractConnection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[AbstractConnection | None]] = collections.deque()

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
        packed = [hiredis.pack_command(tuple(command)) for command in commands]
        async with asyncio.timeout(self.timeout_s):
            conn = await self._checkout()
            reused = conn.is_connected
            try:
                return await self._exchange(conn, packed, len(commands))
            except rx.ConnectionError:
                if not reused:
                    raise
            # A Redis restart broke the idle connections: drop them all, once more on a new one.
            await self.close()
            return await self._exchange(await self._checkout(), packed, len(commands))

    async def _exchange(self, conn: AbstractConnection, packed: list[bytes], replies: int) -> list[Any]:
        try:
            if not conn.is_connected:
                await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            await conn.send_packed_command(packed, check_health=False)
            answers = [await self._reply(conn) for _ in range(replies)]
        except BaseException:
            await conn.disconnect(nowait=True)
            self._drop()
            raise
        self._checkin(conn)
        return answers

    async def close(self) -> None:
        """Close the idle connections (those in use close when their exchange ends)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)
            self._drop()

    @staticmethod
    async def _reply(conn: AbstractConnection) -> Any:
        try:
            return await conn.read_response()
        except rx.ResponseError as error:  # the command's own error: the next replies follow
            return error

    async def _checkout(self) -> AbstractConnection:
        if self._idle:
            return self._idle.pop()
        if self._open < self._max:
            self._open += 1
            return self._connection_class(**self._kwargs)
        waiter: asyncio.Future[AbstractConnection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            conn = await waiter
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif not waiter.cancelled():  # handed over just as we gave up: pass it on
                handed = waiter.result()
                if handed is None:
                    self._free_slot()
                else:
                    self._checkin(handed)
            raise
        if conn is None:  # a slot was freed rather than a connection
            self._open += 1
            return self._connection_class(**self._kwargs)
        return conn

    def _checkin(self, conn: AbstractConnection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _drop(self) -> None:
        self._open -= 1
        self._free_slot()

    def _free_slot(self) -> None:
        """A connection may be opened again: the first waiter opens it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
