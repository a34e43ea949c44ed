"""The hot path's round trips (gateway.state.wire) against a real redis-server: replies in
order with error replies among them, concurrent callers pipelined on a bounded number of
connections each getting its own replies, a caller that gives up, the deadline, and a
Redis restart that broke the idle connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aredis
from redis import exceptions as rx

from gateway.state.wire import Wire
from tests.redis_proc import RedisProcess


def wire_for(url: str, *, max_connections: int = 4, timeout_s: float = 1.0) -> Wire:
    pool = aredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, socket_timeout=timeout_s)
    return Wire(pool, max_connections=max_connections, timeout_s=timeout_s)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


async def test_replies_come_in_order_and_an_error_reply_does_not_stop_the_rest(redis_url: str) -> None:
    wire = wire_for(redis_url)
    replies = await wire.execute([
        ("SET", "wire:a", "1"),
        ("EVALSHA", "0" * 40, 0),  # no such script: NOSCRIPT, as a reply
        ("INCRBY", "wire:a", 41),
        ("GET", "wire:a"),
    ])
    assert replies[0] == b"OK"  # raw replies: the ledger reads scripts' results as they come
    assert isinstance(replies[1], rx.NoScriptError)
    assert replies[2:] == [42, b"42"]
    # The connection that carried the error reply is still in step: the next exchange reads its own.
    assert await wire.execute([("GET", "wire:a")]) == [b"42"]
    await wire.close()


async def test_concurrent_callers_share_a_few_connections_and_each_gets_its_own_replies(redis_url: str) -> None:
    wire = wire_for(redis_url, max_connections=2)
    stalled = "local t0 = redis.call('TIME') repeat local t = redis.call('TIME') until (t[2] - t0[2]) % 1000000 > 2000"

    async def caller(n: int) -> list[object]:
        return await wire.execute([("EVAL", stalled, 0), ("SET", f"wire:own:{n}", n), ("INCR", "wire:n"), ("GET", f"wire:own:{n}")])

    results = await asyncio.gather(*(caller(n) for n in range(20)))
    assert [r[3] for r in results] == [str(n).encode() for n in range(20)]  # nobody read another's reply
    assert sorted(r[2] for r in results) == list(range(1, 21))
    assert len(wire._pipes) <= 2  # the cap held: the 20 were pipelined on at most two connections
    await wire.close()


async def test_a_caller_that_gives_up_leaves_the_replies_in_step_for_the_next(redis_url: str) -> None:
    wire = wire_for(redis_url, max_connections=1)
    slow = "local t0 = redis.call('TIME') repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 100000 return 'slow'"
    gives_up = asyncio.create_task(wire.execute([("EVAL", slow, 0), ("SET", "wire:late", "1")]))
    await asyncio.sleep(0.02)
    gives_up.cancel()
    assert await wire.execute([("GET", "wire:nothing"), ("PING",)]) == [None, b"PONG"]
    assert gives_up.cancelled()
    await wire.close()


async def test_a_stalled_redis_misses_the_deadline_and_its_connection_is_not_reused(redis_url: str) -> None:
    wire = wire_for(redis_url, timeout_s=0.2)
    busy = "local t0 = redis.call('TIME') repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 500000"
    with pytest.raises(TimeoutError):
        await wire.execute([("EVAL", busy, 0)])
    assert not wire._pipes  # closed: its late reply must never answer someone else
    await asyncio.sleep(0.4)  # the script ends
    assert await wire.execute([("PING",)]) == [b"PONG"]
    await wire.close()


async def test_those_behind_a_stalled_exchange_time_out_too_and_are_never_sent_twice(redis_url: str) -> None:
    wire = wire_for(redis_url, max_connections=1, timeout_s=0.2)
    busy = "local t0 = redis.call('TIME') repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 500000"
    stalled = asyncio.create_task(wire.execute([("EVAL", busy, 0)]))
    await asyncio.sleep(0)
    behind = asyncio.create_task(wire.execute([("INCR", "wire:behind")]))
    for task in (stalled, behind):
        with pytest.raises(TimeoutError):
            await task
    await asyncio.sleep(0.5)  # the script ends; what was written behind it ran once, or not at all
    assert await wire.execute([("GET", "wire:behind")]) in ([b"1"], [None])
    await wire.close()


async def test_after_a_redis_restart_the_broken_idle_connections_are_replaced(own_redis: RedisProcess) -> None:
    wire = wire_for(own_redis.url)
    await asyncio.gather(*(wire.execute([("PING",)]) for _ in range(3)))  # idle connections to the old process
    own_redis.stop()
    own_redis.start()
    assert await wire.execute([("SET", "wire:back", "1"), ("GET", "wire:back")]) == [b"OK", b"1"]
    await wire.close()


async def test_redis_down_is_a_connection_error(own_redis: RedisProcess) -> None:
    wire = wire_for(own_redis.url)
    own_redis.stop()
    with pytest.raises((rx.ConnectionError, OSError)):
        await wire.execute([("PING",)])
    assert not wire._pipes
    await wire.close()
