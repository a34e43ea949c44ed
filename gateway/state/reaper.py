"""Closes reservations orphaned by a crashed replica, journaled `aborted`.

A reservation is due when its lease runs out (its owner stopped renewing it: the process
died) or, at the latest, when its TTL does (the backstop). One whose lease ran out is
closed at nothing, within seconds of the death: nothing was answered. One past its TTL is
charged in full, as it always was. Every replica runs one, over every shard of the due
index; the close script is compare-and-set, so two replicas reaping the same reservation
close it once. On Redis Cluster a tenant hold (see `ledger`) is due at the reservation's
TTL: while its session's reservation is still open it is looked at again later; once that
reservation is settled, closed or was never made, the hold is closed as it stands, charged
in full (the tenant's counter keeps the estimate, as a reaped reservation's always has).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from gateway import redis_keys as keys
from gateway.errors import ServiceUnavailable
from gateway.redis_client import AnyRedis
from gateway.state.entries import Kind, make_entry
from gateway.state.ledger import REDIS_ERRORS, Ledger

log = logging.getLogger("gateway.reaper")
BATCH = 100


async def reap_due(redis: AnyRedis, ledger: Ledger, *, now: float | None = None) -> int:
    """Reap up to BATCH reservations (and tenant holds) per shard past their deadline;
    returns how many were reaped."""
    now = time.time() if now is None else now
    now_ms = int(now * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(ledger.shards):
            pipe.zrangebyscore(keys.reservations_due(shard), "-inf", now_ms, start=0, num=BATCH)
        per_shard: list[list[bytes]] = await pipe.execute()
    reaped = 0
    for shard, due in enumerate(per_shard):
        for member in due:
            text = member.decode()
            if text.startswith(keys.TENANT_DUE):
                reaped += await _reap_hold(redis, ledger, shard, text, now_ms)
            else:
                reaped += await _reap_one(redis, ledger, shard, text, now_ms)
    return reaped


async def _reap_one(redis: AnyRedis, ledger: Ledger, shard: int, member: str, now_ms: int) -> int:
    session_id, _, request_id = member.partition("|")
    reservation = await redis.hget(keys.reservations(session_id), request_id)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    if reservation is None or reservation.startswith((b"R", b"Z")):
        await redis.zrem(keys.reservations_due(shard), member)
        return 0
    nanos, tokens, reserved, _ = reservation.decode().split(":", 3)
    if now_ms - int(reserved.partition("@")[0]) >= ledger.reservation_ttl_ms:
        entry = make_entry(
            Kind.ABORTED, rid=request_id, cost_nanos=int(nanos), tokens=int(tokens),
            reason="reservation expired unsettled", ts=now_ms,
        )
        charge = "full"
    elif ledger.leases.get(session_id, request_id) is not None:
        return 0  # ours, and we are alive: Redis was away and the renewal is late
    else:
        entry = make_entry(
            Kind.ABORTED, rid=request_id, cost_nanos=0, tokens=0,
            reason="its process stopped renewing the lease", ts=now_ms,
        )
        charge = "zero"
    return int(await ledger.reap(session_id, request_id, reservation, entry, charge=charge))


async def _reap_hold(redis: AnyRedis, ledger: Ledger, shard: int, member: str, now_ms: int) -> int:
    tenant, session_id, request_id, reserved_ms = keys.parse_tenant_due(member)
    reservation = await redis.hget(keys.reservations(session_id), request_id)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    open_ = reservation is not None and not reservation.startswith((b"R", b"Z"))
    if open_ and reservation.split(b":", 3)[2].partition(b"@")[0] == str(reserved_ms).encode():
        # Its reservation is open (not marked): its owner, or the reaper, closes that first.
        await redis.zadd(keys.reservations_due(shard), {member: now_ms + ledger.reservation_ttl_ms})
        return 0
    return int(await ledger.reap_hold(tenant, session_id, request_id, reserved_ms))


class ReaperObserver(Protocol):
    """What the reaper reports (gateway.metrics.Metrics is one; state/ sits below it)."""

    def observe_reaped(self, count: int) -> None: ...

    def observe_redis_error(self, where: str) -> None: ...


async def run_reaper(redis: AnyRedis, ledger: Ledger, interval_s: float, stop: asyncio.Event, observer: ReaperObserver | None = None) -> None:
    """Reap until `stop` is set. A flag rather than cancellation alone: redis-py can turn
    a cancellation that lands mid-command into a connection error, which we'd retry."""
    while not stop.is_set():
        try:
            while True:
                reaped = await reap_due(redis, ledger)
                if observer is not None and reaped:
                    observer.observe_reaped(reaped)
                if reaped < BATCH or stop.is_set():
                    break
        except (ServiceUnavailable, *REDIS_ERRORS):
            if observer is not None:
                observer.observe_redis_error("reaper")
            if not stop.is_set():
                log.warning("reaper: Redis unavailable; will retry")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
