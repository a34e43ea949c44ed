"""What this process holds in Redis while it works, kept alive or kept for later.

`Leases`: each request between reserve and settle, with its lease. A reservation's lease
is its deadline in `reservations_due`, a pending Idempotency-Key's is the record's `lease`
field; the Ledger renews them all in one pipeline every third of a lease. A lease that runs
out means its process died: the reaper closes the reservation and a retry with the same
key takes the request over, within seconds instead of after the reservation's TTL.

`Backlog`: settlements Redis could not take (it was down or stalled), retried with backoff
until it does. The settle script is idempotent, so one that did run is not charged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger("gateway.leases")
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 0.5
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Held:
    reserved_ms: int  # the reserve's time, written into the reservation
    record: str | None  # the pending Idempotency-Key record, when the request has a key


class Leases:
    def __init__(self, *, lease_ms: int, ttl_ms: int) -> None:
        self.lease_ms = lease_ms
        self.ttl_ms = ttl_ms
        self._held: dict[tuple[str, str], Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def deadline(self, reserved_ms: int, now_ms: int) -> int:
        """A lease never runs past the reservation's TTL: from there the backstop rules."""
        return min(now_ms + self.lease_ms, reserved_ms + self.ttl_ms)

    def hold(self, session_id: str, request_id: str, held: Held) -> None:
        self._held[(session_id, request_id)] = held

    def get(self, session_id: str, request_id: str) -> Held | None:
        return self._held.get((session_id, request_id))

    def drop(self, session_id: str, request_id: str) -> None:
        self._held.pop((session_id, request_id), None)

    def renewal(self, now_ms: int) -> tuple[list[Any], list[tuple[str, str, int]]]:
        """(ZADD score/member pairs, [(record, request id, lease deadline)]) renewing every
        lease held; requests past the TTL are let go (the reaper's backstop takes them)."""
        scores: list[Any] = []
        records: list[tuple[str, str, int]] = []
        for (session_id, request_id), held in list(self._held.items()):
            if now_ms - held.reserved_ms >= self.ttl_ms:
                del self._held[(session_id, request_id)]
                continue
            scores += [self.deadline(held.reserved_ms, now_ms), f"{session_id}|{request_id}"]
            if held.record is not None:
                records.append((held.record, request_id, now_ms + self.lease_ms))
        return scores, records


class Backlog(Generic[T]):
    """Deferred settlements, oldest first, written by one task with backoff."""

    def __init__(self, limit: int, write: Callable[[T], Awaitable[object]], retried: type[Exception]) -> None:
        self.limit = limit
        self._write = write
        self._retried = retried  # the failure that means "Redis unavailable: try again later"
        self._items: deque[T] = deque()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit

    def push(self, item: T) -> None:
        # Never refused: admission stops at `limit`, so only requests already running add more.
        self._items.append(item)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        delay = RETRY_FIRST_S
        while self._items:
            try:
                await self._write(self._items[0])
            except self._retried:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception:
                # Not Redis being away: retrying would not help. The reaper closes it.
                log.exception("dropped a deferred settlement that Redis refused")
            self._items.popleft()
            delay = RETRY_FIRST_S

    async def aclose(self, timeout_s: float) -> None:
        """Give the drain `timeout_s` to finish (shutdown), then stop it."""
        task = self._task
        if task is None or task.done():
            return
        deadline = time.monotonic() + timeout_s
        while not task.done() and time.monotonic() < deadline:
            await asyncio.wait([task], timeout=deadline - time.monotonic())
        if not task.done():
            log.warning("%d settlements still deferred at shutdown; the reaper closes them", len(self._items))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
