"""AssemblyStore against a real redis-server: write-once, verified on load, cached, listed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from gateway import redis_keys
from gateway.assembly.compile import compile_plan
from gateway.assembly.model import Assembly, assembly_id
from gateway.assembly.plan import parse_plan
from gateway.assembly.store import AssemblyIntegrityError, AssemblyStore
from gateway.errors import NotFound
from gateway.settings import settings_from_dict

SETTINGS = settings_from_dict(
    {
        "providers": [{"name": "mock", "kind": "mock"}],
        "models": [
            {"name": "m", "provider": "mock", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
        ],
    }
)


def make_assembly(name: str = "plan", max_tokens: int = 100) -> Assembly:
    plan = parse_plan({"name": name, "models": [{"name": "m", "max_tokens": max_tokens}]})
    return compile_plan(plan, SETTINGS).assembly


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    # The shared session redis-server, flushed per test. decode_responses=False, as the
    # app creates it: values come back as bytes.
    conn = aioredis.Redis.from_url(redis_url)
    yield conn
    await conn.aclose()


async def test_put_stores_canonical_json_once(client: aioredis.Redis) -> None:
    assembly = make_assembly()
    store = AssemblyStore(client, clock=lambda: 1000.0)
    assert await store.put(assembly) is True
    assert await client.get(redis_keys.assembly(assembly.id)) == assembly.canonical_json()
    assert await client.zscore(redis_keys.ASSEMBLIES, assembly.id) == 1000.0

    later = AssemblyStore(client, clock=lambda: 2000.0)
    assert await later.put(assembly) is False
    # The first-compiled time is kept, and the content can't have changed (same hash).
    assert await client.zscore(redis_keys.ASSEMBLIES, assembly.id) == 1000.0
    assert await client.get(redis_keys.assembly(assembly.id)) == assembly.canonical_json()


async def test_get_returns_the_stored_assembly(client: aioredis.Redis) -> None:
    assembly = make_assembly()
    await AssemblyStore(client).put(assembly)
    loaded = await AssemblyStore(client).get(assembly.id)
    assert loaded == assembly
    assert loaded.id == assembly.id


async def test_get_unknown_or_malformed_id_is_not_found(client: aioredis.Redis) -> None:
    store = AssemblyStore(client)
    with pytest.raises(NotFound):
        await store.get("asm_" + "0" * 32)
    with pytest.raises(NotFound):
        await store.get("../../etc/passwd")


async def test_tampered_assembly_is_refused(client: aioredis.Redis) -> None:
    assembly = make_assembly(max_tokens=100)
    await AssemblyStore(client).put(assembly)
    forged = make_assembly(max_tokens=100_000).canonical_json()
    await client.set(redis_keys.assembly(assembly.id), forged)
    with pytest.raises(AssemblyIntegrityError) as caught:
        await AssemblyStore(client).get(assembly.id)
    assert caught.value.status == 500
    assert caught.value.code == "assembly_integrity"


async def test_unreadable_assembly_is_refused_even_when_the_hash_matches(
    client: aioredis.Redis,
) -> None:
    garbage = b'{"schema":1,"name":"no models"}'
    await client.set(redis_keys.assembly(assembly_id(garbage)), garbage)
    with pytest.raises(AssemblyIntegrityError):
        await AssemblyStore(client).get(assembly_id(garbage))


async def test_reading_tolerates_fields_from_a_newer_schema(client: aioredis.Redis) -> None:
    data = orjson.loads(make_assembly().canonical_json())
    data["added_later"] = {"anything": True}
    newer = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    await client.set(redis_keys.assembly(assembly_id(newer)), newer)
    loaded = await AssemblyStore(client).get(assembly_id(newer))
    assert loaded.name == "plan"
    assert "m" in loaded.models


async def test_loaded_assemblies_are_cached_with_a_bound(client: aioredis.Redis) -> None:
    assemblies = [make_assembly(name=f"p{i}") for i in range(3)]
    store = AssemblyStore(client, cache_size=2)
    for assembly in assemblies:
        await store.put(assembly)
        await store.get(assembly.id)
    await client.flushall()
    # The two most recent stay cached; the oldest was evicted and Redis no longer has it.
    assert await store.get(assemblies[2].id) == assemblies[2]
    assert await store.get(assemblies[1].id) == assemblies[1]
    with pytest.raises(NotFound):
        await store.get(assemblies[0].id)


async def test_list_gives_newest_first_up_to_limit(client: aioredis.Redis) -> None:
    now = [100.0]
    store = AssemblyStore(client, clock=lambda: now[0])
    ids = []
    for i in range(3):
        assembly = make_assembly(name=f"p{i}")
        await store.put(assembly)
        ids.append(assembly.id)
        now[0] += 1
    assert await store.list() == ids[::-1]
    assert await store.list(limit=2) == [ids[2], ids[1]]
    assert await store.list(limit=0) == []
