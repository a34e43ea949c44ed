"""The Redis client the gateway builds: a cluster client in cluster mode that finds every
master from one node, sends each script to its slot's master, and packs with hiredis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway import redis_keys as keys
from gateway.redis_client import close, make_redis
from gateway.settings import RedisSettings
from tests.redis_proc import RedisClusterProcess


async def test_cluster_mode_finds_every_master_from_one_node(redis_cluster: RedisClusterProcess) -> None:
    client = make_redis(redis_cluster.url, RedisSettings(url=redis_cluster.url, cluster=True))
    try:
        assert isinstance(client, RedisCluster)
        # Keys of three sessions on three different slots: each lands on its own master.
        for sid in ("sess_a", "sess_b", "sess_c"):
            await client.hset(keys.session(sid), "status", "active")
            assert await client.hget(keys.session(sid), "status") == b"active"
        assert {n.port for n in client.get_primaries()} == set(redis_cluster.masters())
        nodes = client.get_primaries()
        assert all(n.connection_class.__name__ == "HiredisPacking" for n in nodes)
        packed = nodes[0].connection_class(host="127.0.0.1", port=1).pack_command("SCRIPT LOAD", "return 1")
        assert packed == [b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$8\r\nreturn 1\r\n"]
    finally:
        await close(client)


async def test_single_node_mode_stays_a_plain_client(redis_url: str) -> None:
    client = make_redis(redis_url, RedisSettings(url=redis_url))
    try:
        assert isinstance(client, Redis)
        assert await client.ping()
    finally:
        await close(client)


async def test_a_connection_torn_down_under_a_caller_is_a_connection_error_not_a_bug(redis_url: str) -> None:
    # redis-py's race, as the cluster failover test met it: one task connects (its handshake
    # writes from a task of its own, a turn of the loop later) while another disconnects the
    # same connection (a node failing over). The first then found its writer gone:
    # "AttributeError: 'NoneType' object has no attribute 'writelines'", a 500. It must be
    # a lost connection: a 503, or a retry.
    client = make_redis(redis_url, RedisSettings(url=redis_url))
    assert isinstance(client, Redis)
    try:
        connection = client.connection_pool.make_connection()

        async def tear_down_once_open() -> None:
            while connection._writer is None:
                await asyncio.sleep(0)
            await connection.disconnect(nowait=True)  # as the cluster client drops a failed node's

        tearing = asyncio.ensure_future(tear_down_once_open())
        with pytest.raises(RedisConnectionError, match="lost while in use"):
            await connection.connect()
        await tearing
        assert not connection.is_connected
        await connection.connect()  # and the next use connects afresh
        await connection.send_command("PING")
        assert await connection.read_response() == b"PONG"
        await connection.disconnect()
    finally:
        await close(client)
