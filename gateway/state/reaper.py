"""Closes reservations orphaned by a crashed replica, journaled `aborted`.

A reservation is due when its lease runs out (its owner stopped renewing it: the process
died) or, at the latest, when its TTL does (the backstop). One whose lease ran out is
closed at nothing, within seconds of the death: nothing was answered. One past its TTL is
charged in full, as it always was. Every replica runs one; the close script is
compare-and-set, so two replicas reaping the same reservation close it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from redis.asyncio import Redis

from gateway import redis_keys as keys
from gateway.errors import ServiceUnavailable
from gateway.state.entries import Kind, make_entry
from gateway.state.ledger import REDIS_ERRORS, Ledger

log = logging.getLogger("gateway.reaper")
BATCH = 100


async def reap_due(redis: Redis, ledger: Ledger, *, now: float | None = None) -> int:
    """Reap every reservation past its deadline; returns how many were reaped."""
    now = time.time() if now is None else now
    now_ms = int(now * 1000)
    due = await redis.zrangebyscore(keys.RESERVATIONS_DUE, "-inf", now_ms, start=0, num=BATCH)
    reaped = 0
    for member in due:
        session_id, _, request_id = member.decode().partition("|")
        reservation = await redis.hget(keys.reservations(session_id), request_id)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
        if reservation is None or reservation.startswith((b"R", b"Z")):
            await redis.zrem(keys.RESERVATIONS_DUE, member)
            continue
        nanos, tokens, reserved, _ = reservation.decode().split(":", 3)
        if now_ms - int(reserved.partition("@")[0]) >= ledger.reservation_ttl_ms:
            entry = make_entry(
                Kind.ABORTED, rid=request_id, cost_nanos=int(nanos), tokens=int(tokens),
                reason="reservation expired unsettled", ts=now_ms,
            )
            charge = "full"
        elif ledger.leases.get(session_id, request_id) is not None:
            continue  # ours, and we are alive: Redis was away and the renewal is late
        else:
            entry = make_entry(
                Kind.ABORTED, rid=request_id, cost_nanos=0, tokens=0,
                reason="its process stopped renewing the lease", ts=now_ms,
            )
            charge = "zero"
        if await ledger.reap(session_id, request_id, reservation, entry, charge=charge):
            reaped += 1
    return reaped


class ReaperObserver(Protocol):
    """What the reaper reports (gateway.metrics.Metrics is one; state/ sits below it)."""

    def observe_reaped(self, count: int) -> None: ...

    def observe_redis_error(self, where: str) -> None: ...


async def run_reaper(redis: Redis, ledger: Ledger, interval_s: float, stop: asyncio.Event, observer: ReaperObserver | None = None) -> None:
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
