"""The Ledger against real Redis and its Lua scripts: reserve, settle, refusals, the tenant's
daily counter and its two-slot protocol, a lost script cache, and a reserve that runs after
its caller gave up. Most run on a single node and on a Redis Cluster."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from gateway import redis_keys as keys
from gateway.assembly.compile import compile_plan
from gateway.assembly.model import Assembly, Limits
from gateway.assembly.plan import parse_plan
from gateway.capability import Keyring
from gateway.errors import BudgetExceeded, InvalidRequest, RateLimited, ServiceUnavailable
from gateway.money import usd_to_nanos
from gateway.sessions import SessionStore
from gateway.state.entries import Kind, make_entry, verify_chain
from gateway.state.ledger import CostTags, Ledger
from tests.conftest import BOTH_REDIS, SIGNING_SECRET, make_settings

PLAN: dict[str, Any] = {
    "name": "ledger-test",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 64}],
    "budget": {"usd": 1.0},
}
NO_LIMITS = Limits()
# Busy-waits inside Redis for ARGV[1] microseconds: Redis is stalled, not down.
STALL = (
    "local t0 = redis.call('TIME') repeat local t = redis.call('TIME') "
    "until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1])"
)


def assembly_of(plan: dict[str, Any]) -> Assembly:
    return compile_plan(parse_plan(plan), make_settings()).assembly


@pytest.fixture
async def ledger(client: aredis.Redis) -> Ledger:
    return Ledger(client, reservation_ttl_s=60, journal_retention_s=3600)


async def open_session(ledger: Ledger, budget_usd: float | None = 1.0, plan: dict[str, Any] = PLAN) -> str:
    store = SessionStore(ledger.redis, ledger, Keyring.from_sources(SIGNING_SECRET), retention_s=3600)
    opened = await store.open(assembly_of(plan), tenant=None, budget_nanos=None if budget_usd is None else usd_to_nanos(budget_usd), ttl_s=None, labels={})
    return opened.session_id


async def session_hash(client: aredis.Redis, session_id: str) -> dict[str, int]:
    raw = await client.hgetall(keys.session(session_id))
    return {k.decode(): int(v) for k, v in raw.items() if v.lstrip(b"-").isdigit()}


def tags(session_id: str, tenant: str = "acme") -> CostTags:
    return CostTags(tenant=tenant, session_id=session_id, model="gpt-4o-mini", assembly_id="asm_test")


async def reserve(ledger: Ledger, session_id: str, rid: str, est: int, *, tenant: str | None = "acme", limits: Limits = NO_LIMITS, tokens: int = 10) -> Any:
    return await ledger.reserve(
        session_id=session_id, tenant=tenant, request_id=rid, est_nanos=est, est_tokens=tokens,
        step_candidates="", limits=limits, entry=make_entry(Kind.REQUEST, rid=rid, est_nanos=est, model="gpt-4o-mini", asm="asm_test"),
    )


async def settle(ledger: Ledger, session_id: str, rid: str, actual: int, *, tenant: str = "acme", tokens: int = 5) -> Any:
    return await ledger.settle(
        session_id=session_id, request_id=rid, actual_nanos=actual, actual_tokens=tokens, advance=True,
        entry=make_entry(Kind.RESPONSE, rid=rid, cost=actual), tags=tags(session_id, tenant),
    )


@BOTH_REDIS
async def test_reserve_then_settle_charges_actual_and_returns_the_rest(ledger: Ledger, client: aredis.Redis) -> None:
    sid = await open_session(ledger, budget_usd=0.001)  # 1_000_000 nanos
    admission = await reserve(ledger, sid, "r1", 300_000)
    assert admission.budget_left_nanos == 700_000
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"], s["requests"]) == (300_000, 0, 1)

    settlement = await settle(ledger, sid, "r1", 120_000)
    assert settlement.budget_left_nanos == 880_000
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"], s["reserved_tokens"], s["spent_tokens"]) == (0, 120_000, 0, 5)
    assert await client.hlen(keys.reservations(sid)) == 0
    assert await client.zcard(keys.reservations_due(keys.shard_of(sid, ledger.shards))) == 0
    entries = await client.xrange(keys.journal(sid))
    assert [f[b"kind"] for _, f in entries] == [b"state", b"request", b"response"]
    assert verify_chain(entries).ok


@BOTH_REDIS
async def test_a_reserve_over_budget_is_refused_and_writes_nothing(ledger: Ledger, client: aredis.Redis) -> None:
    sid = await open_session(ledger, budget_usd=0.001)
    await reserve(ledger, sid, "r1", 600_000)
    before = await client.xlen(keys.journal(sid))
    with pytest.raises(BudgetExceeded) as caught:
        await reserve(ledger, sid, "r2", 400_001)
    assert caught.value.status == 429 and caught.value.code == "budget_exceeded"
    assert caught.value.extra == {"budget": "usd", "remaining": "0.000400000"}
    await reserve(ledger, sid, "r3", 400_000)  # exactly what is left fits
    s = await session_hash(client, sid)
    assert s["reserved_nanos"] == 1_000_000 and s["requests"] == 2
    assert await client.xlen(keys.journal(sid)) == before + 1


@BOTH_REDIS
async def test_a_request_id_already_in_flight_is_refused_without_touching_its_reservation(ledger: Ledger, client: aredis.Redis) -> None:
    sid = await open_session(ledger)
    await reserve(ledger, sid, "same", 1000)
    with pytest.raises(InvalidRequest) as caught:
        await reserve(ledger, sid, "same", 5000)
    assert caught.value.status == 409 and caught.value.code == "request_in_flight"
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["requests"]) == (1000, 1)
    await settle(ledger, sid, "same", 700)
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"]) == (0, 700)
    await reserve(ledger, sid, "same", 1000)  # settled: the id is free again


@BOTH_REDIS
async def test_the_tenant_day_counter_only_moves_for_sessions_that_charged_it(ledger: Ledger, client: aredis.Redis) -> None:
    """A session without a tenant limit must not correct (lower) the counter that limited
    sessions of the same tenant are checked against."""
    limited = await open_session(ledger)
    unlimited = await open_session(ledger)
    day_limit = Limits(tenant_usd_nanos_per_day=1_000_000)
    counter = keys.tenant_spend("acme", time.strftime("%Y%m%d", time.gmtime()))

    await reserve(ledger, limited, "a1", 400_000, limits=day_limit)
    assert int(await client.get(counter)) == 400_000
    await settle(ledger, limited, "a1", 100_000)
    assert int(await client.get(counter)) == 100_000

    await reserve(ledger, unlimited, "b1", 500_000)
    await settle(ledger, unlimited, "b1", 1_000)
    assert int(await client.get(counter)) == 100_000

    await reserve(ledger, limited, "a2", 900_000, limits=day_limit)
    with pytest.raises(BudgetExceeded) as caught:
        await reserve(ledger, limited, "a3", 1, limits=day_limit)
    assert caught.value.extra["budget"] == "tenant_usd_day"


@BOTH_REDIS
async def test_session_rate_limit_is_enforced_in_the_reserve(ledger: Ledger) -> None:
    sid = await open_session(ledger)
    limits = Limits(session_rpm=2)
    await reserve(ledger, sid, "r1", 1, limits=limits)
    await reserve(ledger, sid, "r2", 1, limits=limits)
    with pytest.raises(RateLimited) as caught:
        await reserve(ledger, sid, "r3", 1, limits=limits)
    assert caught.value.code == "session_rpm"


@BOTH_REDIS
async def test_scripts_are_reloaded_after_redis_forgets_them(ledger: Ledger, client: aredis.Redis) -> None:
    sid = await open_session(ledger)
    await client.script_flush()
    await reserve(ledger, sid, "r1", 1000)
    await client.script_flush()
    await settle(ledger, sid, "r1", 10)
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"]) == (0, 10)


async def test_a_reserve_that_runs_after_its_caller_timed_out_is_released(redis_url: str, client: aredis.Redis) -> None:
    """Redis stalls; the reserve times out (the request is never forwarded) but runs when
    Redis catches up. Its reservation goes back instead of waiting for the reaper's full
    charge."""
    impatient = aredis.Redis.from_url(redis_url, socket_timeout=0.2)
    ledger = Ledger(impatient, reservation_ttl_s=60, journal_retention_s=3600)
    try:
        sid = await open_session(ledger)
        await ledger.load_scripts()
        await reserve(ledger, sid, "warm", 10)
        stall = threading.Thread(target=lambda: redis.Redis.from_url(redis_url).eval(STALL, 0, 800_000))
        stall.start()
        await asyncio.sleep(0.1)
        with pytest.raises(ServiceUnavailable):
            await reserve(ledger, sid, "late", 50_000)
        await asyncio.to_thread(stall.join)
        deadline = time.monotonic() + 5
        while (await session_hash(client, sid))["reserved_nanos"] != 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        s = await session_hash(client, sid)
        assert (s["reserved_nanos"], s["spent_nanos"]) == (10, 0)
        kinds = [(f[b"kind"], f[b"rid"]) for _, f in await client.xrange(keys.journal(sid)) if b"rid" in f]
        assert kinds[-2:] == [(b"request", b"late"), (b"error", b"late")]
    finally:
        await ledger.aclose()
        await impatient.aclose()


@pytest.fixture
def held(client: aredis.Redis) -> Ledger:
    """Tenant limits by the two-slot protocol (a cluster's), here on either kind of Redis."""
    return Ledger(client, reservation_ttl_s=60, journal_retention_s=3600, tenant_holds=True)


def _today() -> str:
    return time.strftime("%Y%m%d", time.gmtime())


@BOTH_REDIS
async def test_a_tenant_hold_is_given_back_when_the_session_refuses(held: Ledger, client: aredis.Redis) -> None:
    ledger = held
    """Tenant first, then session: the session's refusal releases the tenant's hold, counts included."""
    sid = await open_session(ledger, budget_usd=0.0001)  # 100_000 nanos
    limits = Limits(tenant_usd_nanos_per_day=1_000_000, tenant_rpm=10, tenant_tpm=1000)
    with pytest.raises(BudgetExceeded) as caught:
        await reserve(ledger, sid, "big", 200_000, limits=limits, tokens=7)
    assert caught.value.extra["budget"] == "usd"  # the session refused, not the tenant
    assert int(await client.get(keys.tenant_spend("acme", _today())) or 0) == 0
    assert await client.hlen(keys.tenant_holds("acme")) == 0
    minute = int(time.time() * 1000) // 60000
    assert int(await client.get(keys.tenant_rate("acme", "req", minute)) or 0) == 0
    assert int(await client.get(keys.tenant_rate("acme", "tok", minute)) or 0) == 0


@BOTH_REDIS
async def test_settling_corrects_both_the_session_and_the_tenant_hold(held: Ledger, client: aredis.Redis) -> None:
    ledger = held
    sid = await open_session(ledger)
    limits = Limits(tenant_usd_nanos_per_day=1_000_000)
    await reserve(ledger, sid, "r1", 600_000, limits=limits)
    assert int(await client.get(keys.tenant_spend("acme", _today()))) == 600_000  # the hold counts as spent
    assert await client.hlen(keys.tenant_holds("acme")) == 1
    with pytest.raises(BudgetExceeded) as caught:  # 600_000 held + 500_000 > the cap
        await reserve(ledger, sid, "r2", 500_000, limits=limits)
    assert caught.value.extra == {"budget": "tenant_usd_day", "remaining": "0.000400000"}
    await settle(ledger, sid, "r1", 250_000)
    assert int(await client.get(keys.tenant_spend("acme", _today()))) == 250_000
    assert await client.hlen(keys.tenant_holds("acme")) == 0
    await reserve(ledger, sid, "r2", 500_000, limits=limits)  # room again after the refund
    s = await session_hash(client, sid)
    assert (s["spent_nanos"], s["reserved_nanos"]) == (250_000, 500_000)


@BOTH_REDIS
async def test_a_tenant_rate_limit_refuses_before_the_session_reserves_anything(held: Ledger, client: aredis.Redis) -> None:
    ledger = held
    sid = await open_session(ledger)
    limits = Limits(tenant_rpm=1)
    await reserve(ledger, sid, "r1", 10, limits=limits)
    with pytest.raises(RateLimited) as caught:
        await reserve(ledger, sid, "r2", 10, limits=limits)
    assert caught.value.code == "tenant_rpm"
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["requests"]) == (10, 1)
    kinds = [f[b"kind"] for _, f in await client.xrange(keys.journal(sid))]
    assert kinds == [b"state", b"request"]


@BOTH_REDIS
async def test_a_reserve_no_replica_acknowledged_fails_closed_and_is_given_back(client: aredis.Redis) -> None:
    """With `wait_replicas`, a reserve whose writes no replica took in time is not admitted
    (it ran on the master all the same): 503, and its reservation is released at nothing."""
    ledger = Ledger(client, reservation_ttl_s=60, journal_retention_s=3600, wait_replicas=1, wait_timeout_ms=20)
    try:
        sid = await open_session(ledger)
        with pytest.raises(ServiceUnavailable):
            await reserve(ledger, sid, "lonely", 5_000)
        async with asyncio.timeout(10):
            while (await session_hash(client, sid)).get("reserved_nanos", 0) or await client.hlen(keys.reservations(sid)):
                await asyncio.sleep(0.05)
        s = await session_hash(client, sid)
        assert (s["spent_nanos"], s["reserved_nanos"]) == (0, 0)
        kinds = [f[b"kind"] for _, f in await client.xrange(keys.journal(sid))]
        assert kinds == [b"state", b"request", b"error"]
    finally:
        await ledger.aclose()
