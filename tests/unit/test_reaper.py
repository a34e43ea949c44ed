"""The reaper: a reservation nobody settles is charged in full once its deadline passes,
exactly once, journaled `aborted`; a late settle still corrects it to the actual spend."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aredis

from gateway import redis_keys as keys
from gateway.assembly.model import Limits
from gateway.metrics import Metrics
from gateway.state.entries import Kind, make_entry, verify_chain
from gateway.state.ledger import Ledger
from gateway.state.reaper import reap_due, run_reaper
from tests.conftest import BOTH_REDIS
from tests.unit.test_ledger import open_session, reserve, session_hash, settle

pytestmark = BOTH_REDIS

TTL_S = 1


@pytest.fixture
async def ledger(client: aredis.Redis) -> Ledger:
    return Ledger(client, reservation_ttl_s=TTL_S, journal_retention_s=3600)


async def kinds(client: aredis.Redis, session_id: str) -> list[bytes]:
    return [f[b"kind"] for _, f in await client.xrange(keys.journal(session_id))]


async def test_an_orphaned_reservation_is_charged_in_full_once(ledger: Ledger, client: aredis.Redis) -> None:
    sid = await open_session(ledger)
    await reserve(ledger, sid, "orphan", 42_000, tokens=77)
    now = time.time()
    assert await reap_due(client, ledger, now=now) == 0  # not due yet
    assert await reap_due(client, ledger, now=now + TTL_S + 1) == 1

    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"], s["reserved_tokens"], s["spent_tokens"]) == (0, 42_000, 0, 77)
    entries = await client.xrange(keys.journal(sid))
    last = entries[-1][1]
    assert (last[b"kind"], last[b"rid"], last[b"cost_nanos"], last[b"tokens"]) == (b"aborted", b"orphan", b"42000", b"77")
    assert verify_chain(entries).ok
    assert await client.zcard(keys.reservations_due(keys.shard_of(sid, ledger.shards))) == 0

    assert await reap_due(client, ledger, now=now + 3600) == 0
    assert (await session_hash(client, sid))["spent_nanos"] == 42_000
    assert (await kinds(client, sid)).count(b"aborted") == 1


async def test_two_reapers_racing_charge_once(ledger: Ledger, client: aredis.Redis) -> None:
    sid = await open_session(ledger)
    for i in range(5):
        await reserve(ledger, sid, f"r{i}", 1000)
    later = time.time() + TTL_S + 1
    counts = await asyncio.gather(reap_due(client, ledger, now=later), reap_due(client, ledger, now=later))
    assert sum(counts) == 5
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"]) == (0, 5000)


async def test_a_settled_request_is_not_reaped(ledger: Ledger, client: aredis.Redis) -> None:
    sid = await open_session(ledger)
    await reserve(ledger, sid, "ok", 9000)
    await settle(ledger, sid, "ok", 1234)
    assert await reap_due(client, ledger, now=time.time() + 3600) == 0
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"]) == (0, 1234)
    assert b"aborted" not in await kinds(client, sid)


async def test_a_late_settle_corrects_a_reaped_reservation_down(ledger: Ledger, client: aredis.Redis) -> None:
    """A replica that was slow, not dead, settles after the reaper: actual spend wins."""
    sid = await open_session(ledger)
    await reserve(ledger, sid, "slow", 50_000, tokens=100)
    assert await reap_due(client, ledger, now=time.time() + TTL_S + 1) == 1
    await settle(ledger, sid, "slow", 8_000, tokens=30)
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"], s["spent_tokens"]) == (0, 8_000, 30)
    assert await client.hlen(keys.reservations(sid)) == 0
    assert await reap_due(client, ledger, now=time.time() + 3600) == 0


async def test_the_reaper_skips_entries_whose_reservation_is_gone(ledger: Ledger, client: aredis.Redis) -> None:
    # A refused reserve still leaves its deadline behind (the ZADD rides in the same pipeline).
    due = keys.reservations_due(keys.shard_of("sess_gone", ledger.shards))
    await client.zadd(due, {"sess_gone|req_x": 1})
    assert await reap_due(client, ledger, now=time.time()) == 0
    assert await client.zcard(due) == 0
    # And a reap racing a settle (reservation changed since it was read) does nothing.
    sid = await open_session(ledger)
    await reserve(ledger, sid, "r", 500)
    seen = await client.hget(keys.reservations(sid), "r")
    await settle(ledger, sid, "r", 100)
    entry = make_entry(Kind.ABORTED, rid="r", cost=500)
    assert await ledger.reap(sid, "r", seen, entry) is False
    assert (await session_hash(client, sid))["spent_nanos"] == 100


async def test_the_running_reaper_counts_its_settlements_in_the_metrics(ledger: Ledger, client: aredis.Redis) -> None:
    sid = await open_session(ledger)
    for i in range(3):
        await reserve(ledger, sid, f"orphan{i}", 1000)
    await asyncio.sleep(TTL_S + 0.1)  # past their deadlines
    metrics, stop = Metrics(), asyncio.Event()
    reaper = asyncio.create_task(run_reaper(client, ledger, 0.05, stop, metrics))
    try:
        async with asyncio.timeout(10):
            while metrics.reaped._value.get() < 3:
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await reaper
    assert b"abc_reaper_settlements_total 3.0" in metrics.render()


async def test_an_orphaned_tenant_hold_counts_in_full_until_a_late_settle_or_its_session_closes(
    client: aredis.Redis,
) -> None:
    """Tenant limits by the two-slot protocol (Redis Cluster's; here on either kind of Redis).
    A replica stalls with both sides open: the reaper charges the session in full and the
    tenant's hold counts in full; a late settle corrects both to the actual cost. A hold whose
    session side is gone (its process died mid-way) is closed as it stands."""
    ledger = Ledger(client, reservation_ttl_s=TTL_S, journal_retention_s=3600, tenant_holds=True)
    sid = await open_session(ledger)
    limits = Limits(tenant_usd_nanos_per_day=1_000_000)
    spend = keys.tenant_spend("acme", time.strftime("%Y%m%d", time.gmtime()))
    await reserve(ledger, sid, "slow", 300_000, limits=limits)
    assert await reap_due(client, ledger, now=time.time() + TTL_S + 0.5) == 1  # the session's side (its hold is due at 2 TTL)
    assert await client.hlen(keys.tenant_holds("acme")) == 1  # kept, for the late settle
    assert int(await client.get(spend)) == 300_000
    assert (await session_hash(client, sid))["spent_nanos"] == 300_000
    await settle(ledger, sid, "slow", 40_000)
    assert int(await client.get(spend)) == 40_000
    assert await client.hlen(keys.tenant_holds("acme")) == 0
    assert (await session_hash(client, sid))["spent_nanos"] == 40_000

    await reserve(ledger, sid, "dead", 200_000, limits=limits)
    await client.hdel(keys.reservations(sid), "dead")  # as if its session side never came to be
    assert await reap_due(client, ledger, now=time.time() + 3600) == 1  # the hold, closed in full
    assert await client.hlen(keys.tenant_holds("acme")) == 0
    assert int(await client.get(spend)) == 240_000
    assert await client.zcard(keys.reservations_due(keys.shard_of(sid, ledger.shards))) == 0
