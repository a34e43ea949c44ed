"""Closes reservations orphaned by a crashed replica: charged in full, journaled `aborted`.

Every replica runs one over every shard of the due index; the reap script is
compare-and-set, so two replicas reaping the same reservation charge it once. A tenant
hold past its deadline counts in full; it is closed (as it stands) once its session's
reservation is gone, so a late settle can still correct both sides to the actual cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

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
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(ledger.shards):
            pipe.zrangebyscore(keys.reservations_due(shard), "-inf", int(now * 1000), start=0, num=BATCH)
        per_shard: list[list[bytes]] = await pipe.execute()
    reaped = 0
    for shard, due in enumerate(per_shard):
        for member in due:
            reaped += await _reap_one(redis, ledger, shard, member.decode(), now)
    return reaped


async def _reap_one(redis: AnyRedis, ledger: Ledger, shard: int, member: str, now: float) -> int:
    tenant_hold = member.startswith(keys.TENANT_DUE)
    if tenant_hold:
        tenant, _, hold = member[len(keys.TENANT_DUE):].partition(keys.COST_FIELD_SEPARATOR)
        session_id, _, request_id = hold.partition("|")
    else:
        session_id, _, request_id = member.partition("|")
    reservation = await redis.hget(keys.reservations(session_id), request_id)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    if tenant_hold:
        if reservation is not None:
            # The session's side is open, or reaped and awaiting a late settle, which closes
            # the hold at the actual cost: look again later. The hold counts in full meanwhile.
            await redis.zadd(keys.reservations_due(shard), {member: int(now * 1000) + ledger.reservation_ttl_ms})
            return 0
        return int(await ledger.reap_hold(tenant, session_id, request_id))
    if reservation is None or reservation.startswith(b"R"):
        await redis.zrem(keys.reservations_due(shard), member)
        return 0
    nanos, tokens, _, _ = reservation.decode().split(":", 3)
    entry = make_entry(Kind.ABORTED, rid=request_id, cost_nanos=int(nanos), tokens=int(tokens), reason="reservation expired unsettled", ts=int(now * 1000))
    return int(await ledger.reap(session_id, request_id, reservation, entry))


async def run_reaper(redis: AnyRedis, ledger: Ledger, interval_s: float, stop: asyncio.Event) -> None:
    """Reap until `stop` is set. A flag rather than cancellation alone: redis-py can turn
    a cancellation that lands mid-command into a connection error, which we'd retry."""
    while not stop.is_set():
        try:
            while await reap_due(redis, ledger) >= BATCH and not stop.is_set():
                pass
        except (ServiceUnavailable, *REDIS_ERRORS):
            if not stop.is_set():
                log.warning("reaper: Redis unavailable; will retry")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
