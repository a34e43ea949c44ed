"""Leases and deferred settlements against real Redis: a request's owner keeps its leases
alive; once they run out, the reaper closes the reservation at nothing and a duplicate takes
an Idempotency-Key over, exactly once; a settlement Redis could not take is written when it
is back, and settling twice charges once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aredis

from gateway import redis_keys as keys
from gateway.errors import ServiceUnavailable
from gateway.state.entries import Kind, make_entry, verify_chain
from gateway.state.idempotency import await_answer
from gateway.state.ledger import Deferred, Ledger, Stored
from gateway.state.reaper import reap_due
from tests.conftest import BOTH_REDIS
from tests.redis_proc import RedisProcess
from tests.unit.test_ledger import NO_LIMITS, open_session, reserve, session_hash, settle, tags

LEASE_S = 3.0


def make_ledger(client: aredis.Redis, **options: float) -> Ledger:
    return Ledger(client, reservation_ttl_s=60, journal_retention_s=3600, lease_s=LEASE_S, **options)  # type: ignore[arg-type]


async def journal(client: aredis.Redis, session_id: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await client.xrange(keys.journal(session_id))]


async def reserve_keyed(ledger: Ledger, session_id: str, rid: str, record: str, *, now: float, est: int = 5000) -> None:
    await ledger.reserve(
        session_id=session_id, tenant=None, request_id=rid, est_nanos=est, est_tokens=10, step_candidates="",
        limits=NO_LIMITS, entry=make_entry(Kind.REQUEST, rid=rid, est_nanos=est), idempotency_key=record,
        request_hash="h", now=now,
    )


@BOTH_REDIS  # renewals write every index shard's due list, on one node or a cluster
async def test_a_renewed_lease_keeps_the_reaper_away_and_a_lapsed_one_is_closed_at_nothing(client: aredis.Redis) -> None:
    owner, other = make_ledger(client), make_ledger(client)
    sid = await open_session(owner)
    await reserve(owner, sid, "alive", 40_000)
    now = time.time()
    await owner.renew_leases(now=now + 2)  # the owner is alive at +2 s: due at +5 s
    assert await reap_due(client, other, now=now + LEASE_S + 1) == 0

    assert await reap_due(client, other, now=now + 2 + LEASE_S + 0.5) == 1  # the owner stopped renewing
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"], s["reserved_tokens"], s["spent_tokens"]) == (0, 0, 0, 0)
    last = (await journal(client, sid))[-1]
    assert (last[b"kind"], last[b"rid"], last[b"cost_nanos"]) == (b"aborted", b"alive", b"0")
    assert (await client.hget(keys.reservations(sid), "alive")).startswith(b"Z")

    # It was alive after all (a stalled replica): its settlement charges what it used, once.
    await settle(owner, sid, "alive", 12_000, tokens=7)
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"], s["spent_tokens"]) == (0, 12_000, 7)
    assert await client.hlen(keys.reservations(sid)) == 0
    assert verify_chain(await client.xrange(keys.journal(sid))).ok


async def test_the_reaper_leaves_its_own_live_requests_alone_but_keeps_the_ttl_backstop(client: aredis.Redis) -> None:
    ledger = make_ledger(client)
    sid = await open_session(ledger)
    await reserve(ledger, sid, "mine", 30_000)
    now = time.time()
    # Due (Redis was away, the renewal is late) but held by this live process: left alone.
    assert await reap_due(client, ledger, now=now + LEASE_S + 1) == 0
    # Past the TTL it is charged in full, whoever holds it.
    assert await reap_due(client, ledger, now=now + 61) == 1
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"]) == (0, 30_000)
    assert (await journal(client, sid))[-1][b"cost_nanos"] == b"30000"


async def test_a_lapsed_key_is_taken_over_once_and_its_dead_attempt_closed_at_nothing(client: aredis.Redis) -> None:
    dead, retry = make_ledger(client), make_ledger(client)
    sid = await open_session(dead)
    record = keys.idempotency(sid, "k1")
    await reserve_keyed(dead, sid, "first", record, now=time.time())
    assert await retry.take_over(sid, record, "first") is False  # its lease still runs
    held = await client.hgetall(record)
    assert (held[b"state"], held[b"rid"], held[b"owner"]) == (b"pending", b"first", dead.owner.encode())

    await client.hset(record, "lease", int(time.time() * 1000) - 1)  # the owner died a lease ago
    taken = await asyncio.gather(*(retry.take_over(sid, record, "first") for _ in range(4)))
    assert sorted(taken) == [False, False, False, True]
    assert await client.exists(record) == 0
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"]) == (0, 0)
    aborted = [f for f in await journal(client, sid) if f[b"kind"] == b"aborted"]
    assert [(f[b"rid"], f[b"cost_nanos"]) for f in aborted] == [(b"first", b"0")]
    assert await reap_due(client, retry, now=time.time() + 3600) == 0  # nothing left to reap

    # The key is free: the retry's reserve marks it pending for itself.
    await reserve_keyed(retry, sid, "second", record, now=time.time())
    assert (await client.hget(record, "rid"), await client.hget(record, "owner")) == (b"second", retry.owner.encode())


async def test_a_key_renewed_by_its_owner_is_not_taken_over(client: aredis.Redis) -> None:
    owner, retry = make_ledger(client), make_ledger(client)
    sid = await open_session(owner)
    record = keys.idempotency(sid, "k2")
    await reserve_keyed(owner, sid, "first", record, now=time.time() - 10)  # its lease ran out ...
    await owner.renew_leases()  # ... and its owner, alive, renews it
    assert int(await client.hget(record, "lease")) > time.time() * 1000
    assert await retry.take_over(sid, record, "first") is False


async def test_settling_twice_charges_once_and_journals_once(client: aredis.Redis) -> None:
    ledger = make_ledger(client)
    sid = await open_session(ledger)
    await reserve(ledger, sid, "r1", 9_000)
    first = await settle(ledger, sid, "r1", 4_000)
    # A deferred settlement that had in fact run (its reply was lost) is written once, and
    # reported once.
    entry = make_entry(Kind.RESPONSE, rid="r1", cost_nanos=4_000)
    ledger.backlog.push(Deferred(sid, "r1", 4_000, 5, True, entry, tags(sid), None, None, None))
    while len(ledger.backlog):
        await asyncio.sleep(0.01)
    reported = [int(v) async for key in client.scan_iter(match="costs:*") for v in await client.hvals(key)]
    assert sum(reported) == 4_000
    again = await settle(ledger, sid, "r1", 4_000)
    assert first.seq > 0 and again.seq == 0 and again.budget_left_nanos == first.budget_left_nanos
    assert (await session_hash(client, sid))["spent_nanos"] == 4_000
    assert [f[b"kind"] for f in await journal(client, sid)].count(b"response") == 1


async def test_a_closed_request_id_can_be_reused_and_the_old_late_settle_leaves_it_alone(client: aredis.Redis) -> None:
    dead, other = make_ledger(client), make_ledger(client)
    sid = await open_session(dead)
    await reserve(dead, sid, "rid", 7_000)
    assert await reap_due(client, other, now=time.time() + LEASE_S + 1) == 1
    await asyncio.sleep(0.002)  # another millisecond: another reservation
    await reserve(other, sid, "rid", 8_000)  # a client retrying with the same x-request-id
    with pytest.raises(ServiceUnavailable):  # the first one's owner was alive after all: its answer
        await settle(dead, sid, "rid", 1_000)  # is not journaled, so it must not be served
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"]) == (8_000, 0)
    await settle(other, sid, "rid", 2_000)
    s = await session_hash(client, sid)
    assert (s["reserved_nanos"], s["spent_nanos"]) == (0, 2_000)


async def test_a_settlement_redis_could_not_take_is_written_when_it_returns(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis", aof=True).start()
    client = aredis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    ledger = make_ledger(client, settle_backlog=2)
    try:
        sid = await open_session(ledger)
        record = keys.idempotency(sid, "k")
        await reserve_keyed(ledger, sid, "r1", record, now=time.time())
        await reserve(ledger, sid, "r2", 5_000)
        server.stop()
        with pytest.raises(ServiceUnavailable):
            await ledger.settle(
                session_id=sid, request_id="r1", actual_nanos=3_000, actual_tokens=5, advance=True,
                entry=make_entry(Kind.RESPONSE, rid="r1", cost_nanos=3_000), tags=tags(sid),
                answer=Stored(200, {"x-abc-cost-usd": "0.000003000"}, b"the answer", with_budget_left=True),
            )
        with pytest.raises(ServiceUnavailable):
            await settle(ledger, sid, "r2", 3_000)
        assert len(ledger.backlog) == 2
        with pytest.raises(ServiceUnavailable) as refused:
            await reserve(ledger, sid, "r3", 1_000)  # a full backlog: not admitted, Redis or not
        assert refused.value.extra["retry_after_s"] == 1 and "settlements" in refused.value.message

        server.start()
        deadline = time.monotonic() + 10
        while len(ledger.backlog) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        s = await session_hash(client, sid)
        assert (s["reserved_nanos"], s["spent_nanos"]) == (0, 6_000)
        closing = [f for f in await journal(client, sid) if f[b"kind"] == b"response"]
        assert [(f[b"rid"], f[b"deferred"]) for f in closing] == [(b"r1", b"1"), (b"r2", b"1")]
        reported = [int(v) async for key in client.scan_iter(match="costs:*") for v in await client.hvals(key)]
        assert sum(reported) == 6_000  # in the cost reports once
        # The client got 503, but it was charged: a retry with its key gets the answer.
        held = {k.decode(): v for k, v in (await client.hgetall(record)).items()}
        kept = await await_answer(ledger, sid, record, "h", held, wait_s=0)
        assert kept is not None and kept.body == b"the answer"
        assert kept.headers == {"x-abc-cost-usd": "0.000003000", "x-abc-budget-remaining-usd": "0.999992000"}  # r2 still reserved
        assert verify_chain(await client.xrange(keys.journal(sid))).ok
        await reserve(ledger, sid, "r3", 1_000)
    finally:
        await ledger.aclose()
        await client.aclose()
        server.stop()
