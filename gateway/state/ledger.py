"""The Redis side of every request: reserve, settle, reap and journal, as versioned Lua.

Each call is one round trip: the script (which touches only the session's hash-tagged
keys) plus, in the same pipeline, the writes to global indexes. Any Redis trouble
becomes `ServiceUnavailable`: callers fail closed and nothing is forwarded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis

from gateway import redis_keys as keys
from gateway.assembly.model import Limits
from gateway.errors import (
    BudgetExceeded,
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    StateConflict,
    Unauthenticated,
)
from gateway.money import nanos_to_usd_str
from gateway.state.entries import Entry, Kind, make_entry

SCRIPT_NAMES = (
    keys.RESERVE_SCRIPT,
    keys.SETTLE_SCRIPT,
    keys.JOURNAL_APPEND_SCRIPT,
    keys.REAP_SCRIPT,
    keys.REPLAY_TAKE_SCRIPT,
)
REDIS_ERRORS = (rx.RedisError, OSError, TimeoutError)
# After a reserve timed out, when to look for the reservation it may still have made.
RELEASE_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_PENDING_RELEASES = 10_000


def _load_sources() -> dict[str, str]:
    """Each script with the shared journal prelude in front (Lua scripts can't import)."""
    lua = resources.files("gateway") / "lua"
    prelude = (lua / "_journal.lua").read_text(encoding="utf-8")
    return {name: prelude + (lua / f"{name}.lua").read_text(encoding="utf-8") for name in SCRIPT_NAMES}


@dataclass(frozen=True, slots=True)
class Admission:
    step: str  # "" when the Assembly has no steps
    budget_left_nanos: int  # -1: no usd budget
    seq: int
    # The record of an Idempotency-Key already in use; nothing was reserved or journaled.
    held: dict[str, bytes] | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    budget_left_nanos: int
    seq: int


@dataclass(frozen=True, slots=True)
class CostTags:
    """Dimensions of the hourly cost rollups."""

    tenant: str
    session_id: str
    model: str
    assembly_id: str


def _hour_bucket(now: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(now))


def _day(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


class Ledger:
    def __init__(self, redis: Redis, *, reservation_ttl_s: int, journal_retention_s: int, observe: Callable[[str, float], None] | None = None) -> None:
        self.redis = redis
        self._observe = observe or (lambda op, seconds: None)
        self._last_bucket = ""  # the hour bucket this process last registered in COST_BUCKETS
        self.reservation_ttl_ms = reservation_ttl_s * 1000
        self.index_retention_ms = journal_retention_s * 1000
        self._sources = _load_sources()
        self._sha: dict[str, str] = {}
        self._releases: set[asyncio.Task[None]] = set()

    async def load_scripts(self) -> None:
        try:
            for name, source in self._sources.items():
                self._sha[name] = await self.redis.script_load(source)
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("budget store unavailable") from exc

    async def _run(self, name: str, keys_: list[str], args: list[Any], extra: Sequence[tuple[Any, ...]] = ()) -> Any:
        """EVALSHA `name` and the `extra` commands in one pipeline; returns the script's result."""
        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                if name not in self._sha:
                    await self.load_scripts()
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.evalsha(self._sha[name], len(keys_), *keys_, *args)
                    for command in extra:
                        pipe.execute_command(*command)
                    results = await pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as exc:
                raise ServiceUnavailable("budget store unavailable; request not forwarded") from exc
            result = results[0]
            if isinstance(result, rx.NoScriptError) and attempt == 1:
                # Redis restarted and lost its script cache: load and retry the script alone.
                self._sha.clear()
                extra = ()
                continue
            if isinstance(result, Exception):
                raise ServiceUnavailable("budget store unavailable; request not forwarded") from result
            self._observe(name, time.perf_counter() - started)
            return result
        raise ServiceUnavailable("budget store unavailable")

    async def reserve(
        self,
        *,
        session_id: str,
        tenant: str | None,
        request_id: str,
        est_nanos: int,
        est_tokens: int,
        step_candidates: str,
        limits: Limits,
        entry: Entry,
        idempotency_key: str | None = None,
        request_hash: str = "",
        now: float | None = None,
    ) -> Admission:
        """`idempotency_key` is the record's Redis key; with it, a held key wins over everything but
        the session's own state, and a new one is marked pending in the same step."""
        now = time.time() if now is None else now
        now_ms = int(now * 1000)
        minute = now_ms // 60000
        tenant_limited = tenant is not None and (
            limits.tenant_rpm or limits.tenant_tpm or limits.tenant_usd_nanos_per_day is not None
        )
        if tenant_limited:
            assert tenant is not None
            tenant_keys = [
                keys.tenant_spend(tenant, _day(now)),
                keys.tenant_rate(tenant, "req", minute),
                keys.tenant_rate(tenant, "tok", minute),
            ]
        else:
            # No tenant limits: stand-in keys in the session's slot, never read as limits.
            tenant_keys = [keys.session_rate(session_id, f"t{u}", minute) for u in ("usd", "req", "tok")]
        script_keys = [
            keys.session(session_id),
            keys.reservations(session_id),
            keys.journal(session_id),
            keys.journal_head(session_id),
            keys.session_rate(session_id, "req", minute),
            keys.session_rate(session_id, "tok", minute),
            *tenant_keys,
            idempotency_key or keys.idempotency(session_id, "-"),
        ]

        def opt(v: int | None) -> str:
            return "" if v is None else str(v)

        args = [
            now_ms, request_id, est_nanos, est_tokens, step_candidates,
            opt(limits.session_rpm), opt(limits.session_tpm),
            opt(limits.tenant_rpm if tenant_limited else None),
            opt(limits.tenant_tpm if tenant_limited else None),
            opt(limits.tenant_usd_nanos_per_day if tenant_limited else None),
            "" if idempotency_key is None else self.reservation_ttl_ms, request_hash,
            entry.digest, *entry.flat(),
        ]
        due = ("ZADD", keys.RESERVATIONS_DUE, now_ms + self.reservation_ttl_ms, f"{session_id}|{request_id}")
        try:
            result = await self._run(keys.RESERVE_SCRIPT, script_keys, args, [due])
        except ServiceUnavailable as exc:
            if isinstance(exc.__cause__, (rx.TimeoutError, TimeoutError)):
                self._release_later(session_id, tenant, entry)
            raise
        return _admission(result)

    def _release_later(self, session_id: str, tenant: str | None, request: Entry) -> None:
        """A reserve that timed out may still run when a stalled Redis catches up, and the
        request was not forwarded: give that reservation back rather than leave it to the
        reaper, which would charge it in full."""
        if len(self._releases) >= MAX_PENDING_RELEASES:
            return  # the reaper stays the backstop
        task = asyncio.ensure_future(self._release(session_id, tenant, request))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, session_id: str, tenant: str | None, request: Entry) -> None:
        rid = request_id_of(request)
        for delay in RELEASE_DELAYS_S:
            await asyncio.sleep(delay)
            try:
                held = await self.redis.hget(keys.reservations(session_id), rid)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
                if held is None:
                    continue  # not run yet, or never will
                if held.startswith(b"R"):
                    return  # reaped meanwhile: charged in full already
                field = request.fields.get
                entry = make_entry(
                    Kind.ERROR, rid=rid, model=field(b"model"), asm=field(b"asm"), req_hash=field(b"req_hash"),
                    tok_in=0, tok_out=0, cost_nanos=0, status=503, code="service_unavailable",
                    message="budget store timed out; request not forwarded", ts=int(time.time() * 1000),
                )
                tags = CostTags(
                    tenant=tenant or "default", session_id=session_id,
                    model=(field(b"model") or b"").decode(), assembly_id=(field(b"asm") or b"").decode(),
                )
                await self.settle(
                    session_id=session_id, request_id=rid, actual_nanos=0, actual_tokens=0,
                    advance=False, entry=entry, tags=tags,
                )
                return
            except (ServiceUnavailable, *REDIS_ERRORS):
                continue

    async def aclose(self) -> None:
        """Stop pending releases (shutdown); the reaper settles what they leave."""
        for task in list(self._releases):
            task.cancel()
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=1)

    async def settle(
        self,
        *,
        session_id: str,
        request_id: str,
        actual_nanos: int,
        actual_tokens: int,
        advance: bool,
        entry: Entry,
        tags: CostTags,
        now: float | None = None,
    ) -> Settlement:
        now = time.time() if now is None else now
        script_keys = [
            keys.session(session_id),
            keys.reservations(session_id),
            keys.journal(session_id),
            keys.journal_head(session_id),
            keys.tenant_spend(tags.tenant, _day(now)),
        ]
        args = [request_id, actual_nanos, actual_tokens, "1" if advance else "0", entry.digest, *entry.flat()]
        result = await self._run(keys.SETTLE_SCRIPT, script_keys, args, self._index_commands(entry, tags, actual_nanos, now))
        return Settlement(budget_left_nanos=int(result[0]), seq=int(result[1]))

    def _index_commands(self, entry: Entry, tags: CostTags, nanos: int, now: float) -> list[tuple[Any, ...]]:
        bucket = _hour_bucket(now)
        rollup = keys.cost_rollup(bucket)
        min_id = int(now * 1000) - self.index_retention_ms
        kind = entry.fields.get(b"kind", b"")
        commands: list[tuple[Any, ...]] = [
            ("ZREM", keys.RESERVATIONS_DUE, f"{tags.session_id}|{request_id_of(entry)}"),
            ("XADD", keys.JOURNAL_INDEX, "MINID", "~", min_id, "*",
             "session", tags.session_id, "kind", kind, "cost_nanos", nanos, "tenant", tags.tenant,
             "model", tags.model, "assembly", tags.assembly_id),
        ]
        if nanos:
            # One field per (tenant, session, model, assembly); reports group at read time.
            commands.append(("HINCRBY", rollup, keys.cost_field(tags.tenant, tags.session_id, tags.model, tags.assembly_id), nanos))
            if bucket != self._last_bucket:
                commands.append(("ZADD", keys.COST_BUCKETS, int(bucket), bucket))
                self._last_bucket = bucket
        return commands

    async def append(
        self, session_id: str, entry: Entry, *, step: str = "", set_field: tuple[str, str] | None = None,
        extra: Sequence[tuple[Any, ...]] = (),
    ) -> int | None:
        """Journal one entry outside a request's reserve/settle (denials, state changes);
        `extra` commands (a denial's tally) go in the same round trip."""
        field, value = set_field or ("", "")
        script_keys = [keys.journal(session_id), keys.journal_head(session_id), keys.session(session_id)]
        result = await self._run(keys.JOURNAL_APPEND_SCRIPT, script_keys, [entry.digest, step, field, value, *entry.flat()], extra)
        return None if result is None else int(result[0])

    async def take_recorded(self, session_id: str, request_hash: str) -> tuple[str, int, str]:
        """Match a recorded replay's next call: ("ok" | "diverged" | "end", index, recorded call)."""
        script_keys = [keys.replay_cursor(session_id), keys.replay_calls(session_id)]
        status, index, call = await self._run(keys.REPLAY_TAKE_SCRIPT, script_keys, [request_hash])
        return status.decode(), int(index), call.decode()

    async def reap(self, session_id: str, request_id: str, reservation: bytes, entry: Entry) -> bool:
        script_keys = [
            keys.session(session_id),
            keys.reservations(session_id),
            keys.journal(session_id),
            keys.journal_head(session_id),
        ]
        extra = [("ZREM", keys.RESERVATIONS_DUE, f"{session_id}|{request_id}")]
        result = await self._run(keys.REAP_SCRIPT, script_keys, [request_id, reservation, entry.digest, *entry.flat()], extra)
        return bool(result)


# Denial tallies are for the dashboard's recent history, not an audit record (the journal is).
DENIAL_TALLY_TTL_S = 35 * 24 * 3600


def denial_tally(reason: str, now: float) -> list[tuple[Any, ...]]:
    """Commands counting one denial in its hour's rollup, by reason."""
    rollup = keys.denial_rollup(_hour_bucket(now))
    return [("HINCRBY", rollup, reason, 1), ("EXPIRE", rollup, DENIAL_TALLY_TTL_S)]


def request_id_of(entry: Entry) -> str:
    return entry.fields.get(b"rid", b"").decode()


def _admission(result: list[Any]) -> Admission:
    status = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
    if status == "idem":
        flat = result[1:]
        return Admission(step="", budget_left_nanos=-1, seq=0, held={flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)})
    rest = [r.decode() if isinstance(r, bytes) else str(r) for r in result[1:]]
    if status == "ok":
        return Admission(step=rest[0], budget_left_nanos=int(rest[1]), seq=int(rest[2]))
    if status == "missing":
        raise Unauthenticated("session not found", code="session_not_found")
    if status == "duplicate":
        raise InvalidRequest(
            "a request with this x-request-id is already in flight in this session",
            param="x-request-id", code="request_in_flight", status=409,
        )
    if status == "revoked":
        raise Unauthenticated("session revoked", code="session_revoked")
    if status == "expired":
        raise Unauthenticated("session expired", code="session_expired")
    if status == "step":
        raise StateConflict("request does not fit any step allowed next", extra={"current_step": rest[0] or None})
    if status == "rate":
        raise RateLimited(f"rate limit {rest[0]} ({rest[1]}) reached", code=rest[0])
    if status == "budget":
        what, left = rest[0], int(rest[1])
        shown = nanos_to_usd_str(left) if what in ("usd", "tenant_usd_day") else str(left)
        raise BudgetExceeded(
            f"budget exhausted: {what} left {shown}; this request could cost more",
            code="budget_exceeded",
            extra={"budget": what, "remaining": shown},
        )
    raise ServiceUnavailable("unexpected answer from the budget store")
