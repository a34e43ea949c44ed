"""The Redis side of every request: reserve, settle, close and journal, as versioned Lua.

Each call is one round trip: the script (which touches only the session's hash-tagged
keys) plus, in the same pipeline, the writes to global indexes. Any Redis trouble
becomes `ServiceUnavailable`: callers fail closed and nothing is forwarded. A settlement
Redis could not take is kept and written when it is back (see `leases`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
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
from gateway.state.entries import Entry, Kind, digest, make_entry
from gateway.state.leases import Backlog, Held, Leases
from gateway.state.wire import Wire

log = logging.getLogger("gateway.ledger")
SCRIPT_NAMES = (
    keys.RESERVE_SCRIPT,
    keys.SETTLE_SCRIPT,
    keys.JOURNAL_APPEND_SCRIPT,
    keys.CLOSE_SCRIPT,
    keys.LEASE_SCRIPT,
    keys.REPLAY_TAKE_SCRIPT,
)
REDIS_ERRORS = (rx.RedisError, OSError, TimeoutError)
# Redis away, stalled or not yet ready: a settlement that met one of these is tried again.
TRANSIENT = (
    rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, rx.ReadOnlyError, rx.TryAgainError,
    rx.ClusterDownError, rx.MasterDownError, rx.OutOfMemoryError, OSError, TimeoutError,
)
# How long shutdown waits for deferred settlements to be written.
DRAIN_ON_CLOSE_S = 5.0
# An answer kept for an Idempotency-Key: for a day, compressed when large.
KEPT_ANSWER_TTL_MS = 24 * 3600 * 1000
KEPT_COMPRESS_OVER = 4096
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
class Stored:
    """The first answer to a keyed request, as its client received it."""

    status: int
    headers: dict[str, str]
    body: bytes
    # The budget left after settlement goes into the headers; only the settle step knows it.
    with_budget_left: bool = False


@dataclass(frozen=True, slots=True)
class Deferred:
    """A settlement, as Ledger.settle takes it; kept to write once Redis is back."""

    session_id: str
    request_id: str
    actual_nanos: int
    actual_tokens: int
    advance: bool
    entry: Entry
    tags: CostTags
    record: str | None  # the request's Idempotency-Key record: settled in the same step
    answer: Stored | None  # kept in the record; None: the request failed, the key is freed
    reserved_ms: int | None


@dataclass(frozen=True, slots=True)
class Settlement:
    budget_left_nanos: int
    seq: int
    entry_id: str = ""  # of the journal entry that closed the call


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


class RedisAway(ServiceUnavailable):
    """Redis was unreachable, stalled or not ready: worth trying again later."""


def _transient(exc: BaseException | None) -> bool:
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, rx.ResponseError) and str(exc).startswith("BUSY")


class Ledger:
    def __init__(
        self,
        redis: Redis,
        *,
        reservation_ttl_s: int,
        journal_retention_s: int,
        lease_s: float = 3.0,
        settle_backlog: int = 1000,
        observe: Callable[[str, float], None] | None = None,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        # The reserve and settle round trips of a single Redis, without redis-py's pipeline.
        self._wire = Wire.of(redis)
        self._observe = observe or (lambda op, seconds: None)
        self._count = count or (lambda event: None)
        self._last_bucket = ""  # the hour bucket this process last registered in COST_BUCKETS
        self.reservation_ttl_ms = reservation_ttl_s * 1000
        self.index_retention_ms = journal_retention_s * 1000
        # This process, as the owner of the leases it renews.
        self.owner = "gw_" + secrets.token_hex(8)
        self.leases = Leases(lease_ms=int(lease_s * 1000), ttl_ms=self.reservation_ttl_ms)
        self.backlog: Backlog[Deferred] = Backlog(settle_backlog, self._write_deferred, RedisAway)
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
        """EVALSHA `name` and the `extra` commands in one round trip; returns the script's result."""
        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                if name not in self._sha:
                    await self.load_scripts()
                results = await self._send([("EVALSHA", self._sha[name], len(keys_), *keys_, *args), *extra])
            except REDIS_ERRORS as exc:
                raise _unavailable(exc) from exc
            result = results[0]
            if isinstance(result, rx.NoScriptError) and attempt == 1:
                # Redis restarted and lost its script cache: load and retry the script alone.
                self._sha.clear()
                extra = ()
                continue
            if isinstance(result, Exception):
                raise _unavailable(result) from result
            self._observe(name, time.perf_counter() - started)
            return result
        raise ServiceUnavailable("budget store unavailable")

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The commands' replies in order, errors among them; one round trip."""
        if self._wire is not None:
            return await self._wire.execute(commands)
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

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
        capped: tuple[str, int] | None = None,
        now: float | None = None,
    ) -> Admission:
        """`idempotency_key` is the record's Redis key; with it, a held key wins over everything but
        the session's own state, and a new one is marked pending, under this process's lease,
        in the same step. An admitted request is held (its leases renewed) until settled.
        `capped` (counter, cap): the call is counted there and refused once the cap is reached."""
        if self.backlog.full:
            raise ServiceUnavailable(
                "settlements are waiting for the budget store; not admitting new requests",
                extra={"retry_after_s": 1},
            )
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
            keys.capped_calls(session_id),
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
            *(capped or ("", "")), now_ms + self.leases.lease_ms, self.owner,
            entry.digest, *entry.flat(),
        ]
        due = ("ZADD", keys.RESERVATIONS_DUE, self.leases.deadline(now_ms, now_ms), f"{session_id}|{request_id}")
        try:
            result = await self._run(keys.RESERVE_SCRIPT, script_keys, args, [due])
        except ServiceUnavailable as exc:
            if isinstance(exc.__cause__, (rx.TimeoutError, TimeoutError)):
                self._release_later(session_id, tenant, entry)
            raise
        admission = _admission(result)
        if admission.held is None:
            self.leases.hold(session_id, request_id, Held(now_ms, idempotency_key))
        return admission

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
                if held.startswith((b"R", b"Z")):
                    return  # closed by the reaper meanwhile
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
                await self._settle(Deferred(session_id, rid, 0, 0, False, entry, tags, None, None, None))
                return
            except (ServiceUnavailable, *REDIS_ERRORS):
                continue

    async def keep_leases(self, stop: asyncio.Event) -> None:
        """Renew every lease this process holds, every third of a lease, until `stop`."""
        interval = self.leases.lease_ms / 3000
        while not stop.is_set():
            with contextlib.suppress(ServiceUnavailable, *REDIS_ERRORS):
                await self.renew_leases()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def renew_leases(self, now: float | None = None) -> None:
        """One pipeline: one ZADD for every reservation held, one script call per pending key."""
        now_ms = int((time.time() if now is None else now) * 1000)
        scores, records = self.leases.renewal(now_ms)
        if not scores:
            return
        if keys.LEASE_SCRIPT not in self._sha:
            await self.load_scripts()
        async with self.redis.pipeline(transaction=False) as pipe:
            # XX: a reservation settled (or closed) meanwhile is not brought back.
            pipe.execute_command("ZADD", keys.RESERVATIONS_DUE, "XX", *scores)
            for record, request_id, lease in records:
                pipe.evalsha(self._sha[keys.LEASE_SCRIPT], 1, record, request_id, lease)
            results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, rx.NoScriptError) for r in results):
            self._sha.clear()  # Redis lost its scripts; loaded again next time

    async def aclose(self) -> None:
        """Shutdown: write what settlements wait (for a while), stop pending releases; the
        reaper settles what is left."""
        await self.backlog.aclose(DRAIN_ON_CLOSE_S)
        for task in list(self._releases):
            task.cancel()
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=1)
        if self._wire is not None:
            await self._wire.close()

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
        answer: Stored | None = None,
    ) -> Settlement:
        """Settle, and journal `entry`. A keyed request's Idempotency-Key is settled in the
        same step: `answer` is kept for retries, or, without one, the key is freed (the
        request failed; a retry runs again). If Redis is unavailable the settlement is
        deferred (written once it is back) and the caller still gets `ServiceUnavailable`."""
        held = self.leases.get(session_id, request_id)
        job = Deferred(
            session_id, request_id, actual_nanos, actual_tokens, advance, entry, tags,
            None if held is None else held.record, answer, None if held is None else held.reserved_ms,
        )
        try:
            settlement = await self._settle(job)
        except RedisAway:
            # Charged when written, with its answer kept: a retry with its key gets it then.
            self.backlog.push(dataclasses.replace(job, entry=_deferred(entry)))
            self._count("settle_deferred")
            raise
        self.leases.drop(session_id, request_id)
        return settlement

    async def _settle(self, job: Deferred, *, retried: bool = False) -> Settlement:
        """One round trip; a retried settlement (which may have run already) sends the index
        writes only once the script says it settled, so reports never count it twice."""
        now = time.time()
        session_id = job.session_id
        script_keys = [
            keys.session(session_id),
            keys.reservations(session_id),
            keys.journal(session_id),
            keys.journal_head(session_id),
            keys.tenant_spend(job.tags.tenant, _day(now)),
            job.record or keys.idempotency(session_id, "-"),
        ]
        args = [
            job.request_id, job.actual_nanos, job.actual_tokens, "1" if job.advance else "0",
            "" if job.reserved_ms is None else job.reserved_ms, *_record_args(job),
            job.entry.digest, *job.entry.flat(),
        ]
        extra = self._index_commands(job.entry, job.tags, job.actual_nanos, now)
        result = await self._run(keys.SETTLE_SCRIPT, script_keys, args, () if retried else extra)
        entry_id = result[2].decode() if isinstance(result[2], bytes) else str(result[2] or "")
        settlement = Settlement(budget_left_nanos=int(result[0]), seq=int(result[1]), entry_id=entry_id)
        if retried and settlement.seq:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for command in extra:
                        pipe.execute_command(*command)
                    await pipe.execute()
            except REDIS_ERRORS:
                log.warning("a deferred settlement was written, but not its cost report entries")
        return settlement

    async def _write_deferred(self, job: Deferred) -> None:
        settlement = await self._settle(job, retried=True)
        self.leases.drop(job.session_id, job.request_id)
        if settlement.seq:
            log.info("wrote a settlement deferred while Redis was unavailable")

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

    async def reap(self, session_id: str, request_id: str, reservation: bytes, entry: Entry, *, charge: str = "full") -> bool:
        """Close a reservation as read (compare-and-set): "full" charges it all (past its
        TTL), "zero" nothing (its owner's lease ran out). True if it was closed."""
        extra = [("ZREM", keys.RESERVATIONS_DUE, f"{session_id}|{request_id}")]
        _, closed = await self._close(session_id, request_id, entry, reservation=reservation, charge=charge, extra=extra)
        if closed:
            self._count("reaped_" + charge)
        return closed

    async def take_over(self, session_id: str, record: str, request_id: str) -> bool:
        """A duplicate found the lease on `record` run out: close the dead attempt at
        nothing and free the key, atomically, if nobody else did first. True if we did."""
        now_ms = int(time.time() * 1000)
        entry = make_entry(
            Kind.ABORTED, rid=request_id, cost_nanos=0, tokens=0, ts=now_ms,
            reason="its process stopped renewing the lease; a retry took the request over",
        )
        extra = [("ZREM", keys.RESERVATIONS_DUE, f"{session_id}|{request_id}")]
        taken, _ = await self._close(session_id, request_id, entry, record=record, lease_before_ms=now_ms, extra=extra)
        if taken:
            self._count("taken_over")
        return taken

    async def _close(
        self, session_id: str, request_id: str, entry: Entry, *, reservation: bytes = b"", charge: str = "zero",
        record: str | None = None, lease_before_ms: int | None = None, extra: Sequence[tuple[Any, ...]] = (),
    ) -> tuple[bool, bool]:
        script_keys = [
            keys.session(session_id),
            keys.reservations(session_id),
            keys.journal(session_id),
            keys.journal_head(session_id),
            record or keys.idempotency(session_id, "-"),
        ]
        args = [request_id, reservation, charge, "" if lease_before_ms is None else lease_before_ms, entry.digest, *entry.flat()]
        taken, closed = await self._run(keys.CLOSE_SCRIPT, script_keys, args, extra)
        return bool(taken), bool(closed)


# Denial tallies are for the dashboard's recent history, not an audit record (the journal is).
DENIAL_TALLY_TTL_S = 35 * 24 * 3600


def denial_tally(reason: str, now: float) -> list[tuple[Any, ...]]:
    """Commands counting one denial in its hour's rollup, by reason."""
    rollup = keys.denial_rollup(_hour_bucket(now))
    return [("HINCRBY", rollup, reason, 1), ("EXPIRE", rollup, DENIAL_TALLY_TTL_S)]


def request_id_of(entry: Entry) -> str:
    return entry.fields.get(b"rid", b"").decode()


def _unavailable(cause: BaseException) -> ServiceUnavailable:
    if _transient(cause):
        return RedisAway("budget store unavailable; request not forwarded")
    return ServiceUnavailable("budget store unavailable; request not forwarded")


def _record_args(job: Deferred) -> list[Any]:
    """The settle script's arguments 6 to 12: what becomes of the request's Idempotency-Key."""
    answer = job.answer
    if job.record is None:
        return ["", "", "", "", "", "", ""]
    if answer is None:
        return ["free", "", "", "", "", "", ""]
    body, enc = answer.body, ""
    if len(body) > KEPT_COMPRESS_OVER:
        body, enc = zlib.compress(body, 1), "zlib"
    left = "1" if answer.with_budget_left else ""
    return ["keep", answer.status, orjson.dumps(answer.headers), body, enc, KEPT_ANSWER_TTL_MS, left]


def _deferred(entry: Entry) -> Entry:
    """The entry, marked as written after Redis came back (the client was answered 503)."""
    fields = {**entry.fields, b"deferred": b"1"}
    return Entry(fields=fields, digest=digest(fields))


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
        if what == "max_calls":
            raise BudgetExceeded(
                "budget exhausted: this tool's max_calls for the session is reached",
                code="budget_exceeded", extra={"budget": what, "remaining": shown},
            )
        raise BudgetExceeded(
            f"budget exhausted: {what} left {shown}; this request could cost more",
            code="budget_exceeded",
            extra={"budget": what, "remaining": shown},
        )
    raise ServiceUnavailable("unexpected answer from the budget store")
