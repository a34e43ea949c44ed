"""Unit-test fixtures: a plain async Redis client on the session's real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aredis


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aredis.Redis]:
    r = aredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()
