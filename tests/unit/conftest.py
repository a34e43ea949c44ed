"""Unit-test fixtures: a plain async Redis client (a cluster client on a test cluster)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aredis

from tests.redis_proc import is_cluster_url


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aredis.Redis | aredis.RedisCluster]:
    r = aredis.RedisCluster.from_url(redis_url) if is_cluster_url(redis_url) else aredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()
