"""The Redis side of every request: reserve, settle, close and journal, as versioned Lua.

On one Redis node each call is one round trip: the script plus, in the same pipeline, the
writes to the (sharded) global indexes. Any Redis trouble becomes `ServiceUnavailable`:
callers fail closed and nothing is forwarded. A settlement Redis could not take is kept
and written when it is back (see `leases`).

On Redis Cluster every script touches the keys of one hash slot only: the session's
(`{sess:ID}`) or the tenant's (`{ten:NAME}`). The index write a reservation needs to be
found again (its due entry) goes first, then the script, then the other index writes, on
the nodes that hold them. Tenant limits span two slots there, so they are a protocol of
two scripts (README, "Tenant limits on Redis Cluster"): hold the worst case on the
tenant's slot, then reserve on the session's; give the hold back if the session refuses;
settle both; the reaper closes what nobody settles. On one node the reserve script checks
the tenant's counters itself, in the same round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
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
from redis.asyncio.cluster import RedisCluster

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
from gateway.redis_client import AnyRedis
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
    keys.TENANT_RESERVE_SCRIPT,
    keys.TENANT_SETTLE_SCRIPT,
)
# RedisClusterException is no RedisError: the cluster client raises it when no node covers a slot.
REDIS_ERRORS = (rx.RedisError, rx.RedisClusterException, OSError, TimeoutError)
# Redis away, stalled or not yet ready: a settlement that met one of these is tried again.
TRANSIENT = (
    rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, rx.ReadOnlyError, rx.TryAgainError,
    rx.ClusterDownError, rx.MasterDownError, rx.OutOfMemoryError, OSError, TimeoutError,
    rx.RedisClusterException, rx.SlotNotCoveredError,
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


@dataclass(frozen=True, slots=True)
class TenantHold:
    """Redis Cluster: a tenant hold this process made and has yet to settle, and where its
    counters are (the day and minute it was made in)."""

    tenant: str
    day: str
    minute: int
    reserved_ms: int

    def keys(self) -> list[str]:
        return [
            keys.tenant_holds(self.tenant),
            keys.tenant_spend(self.tenant, self.day),
            keys.tenant_rate(self.tenant, "req", self.minute),
            keys.tenant_rate(self.tenant, "tok", self.minute),
        ]

    def field(self, session_id: str, request_id: str) -> str:
        return keys.tenant_hold(session_id, request_id, self.reserved_ms)


class RedisAway(ServiceUnavailable):
    """Redis was unreachable, stalled or not ready: worth trying again later."""


class NotReplicated(RedisAway):
    """A script ran on its master, but fewer replicas than `wait_replicas` acknowledged it in time."""


def _transient(exc: BaseException | None) -> bool:
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, rx.ResponseError) and str(exc).startswith("BUSY")


class Ledger:
    def __init__(
        self,
        redis: AnyRedis,
        *,
        reservation_ttl_s: int,
        journal_retention_s: int,
        lease_s: float = 3.0,
        settle_backlog: int = 1000,
        shards: int = keys.DEFAULT_SHARDS,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
        tenant_holds: bool | None = None,
        observe: Callable[[str, float], None] | None = None,
        count: Callable[[str], None] | None = None,
    ) -> None:
        """`tenant_holds`: tenant limits by the two-slot protocol (default: on a cluster only)."""
        self.redis = redis
        # The reserve and settle round trips of a single Redis, without redis-py's pipeline.
        self._wire = None if isinstance(redis, RedisCluster) else Wire.of(redis)
        self.cluster = isinstance(redis, RedisCluster)
        self.shards = shards
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.tenant_holds = self.cluster if tenant_holds is None else tenant_holds
        # Tenant holds of requests in flight here, by (session, request): settle closes them.
        self._holds: dict[tuple[str, str], TenantHold] = {}
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
        # A script's SHA1 is known without asking Redis, so concurrent requests never race
        # over a cache of them; Redis is (re)taught the sources when it answers NOSCRIPT.
        self._sha = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in self._sources.items()}
        self._loaded = False
        self._releases: set[asyncio.Task[None]] = set()

    async def load_scripts(self, node: Any = None) -> None:
        """Teach Redis the scripts: every master, or (cluster) the one `node` that answered
        NOSCRIPT, e.g. a replica just promoted, which the client may not list as a master yet."""
        where = {} if node is None else {"target_nodes": node}
        try:
            for source in self._sources.values():
                await self.redis.execute_command("SCRIPT LOAD", source, **where)
            if node is None:
                self._loaded = True
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("budget store unavailable") from exc

    async def _run(
        self,
        name: str,
        keys_: list[str],
        args: list[Any],
        extra: Sequence[tuple[Any, ...]] = (),
        *,
        first: Sequence[tuple[Any, ...]] = (),
        wait: bool = False,
    ) -> Any:
        """EVALSHA `name` and the index commands `extra`; returns the script's result.

        One node: `first`, the script and `extra`, in one pipeline. Cluster: `first` (what
        must be written before the script runs: a reservation's due entry, so the reaper can
        always find it) in its own round trip, then the script, then `extra`, once it ran: a
        due entry removed while its settle failed would hide a reservation for good.
        `wait`: the script's writes must reach `wait_replicas` replicas before we answer
        (WAIT, on the script's own connection).
        """
        started = time.perf_counter()
        after: Sequence[tuple[Any, ...]] = ()
        if self.cluster:
            if first:
                await self._commands(first)
            first, extra, after = (), (), extra
        waiting = wait and self.wait_replicas > 0
        for attempt in (1, 2):
            try:
                if not self._loaded:
                    await self.load_scripts()
                elif attempt == 2:
                    await self.load_scripts(self._node_of(keys_[0]) if self.cluster else None)
                commands = [*first, ("EVALSHA", self._sha[name], len(keys_), *keys_, *args)]
                if waiting:
                    commands.append(("WAIT", self.wait_replicas, self.wait_timeout_ms))
                results = await self._send([*commands, *extra], wait_on=keys_[0] if waiting else None)
            except REDIS_ERRORS as exc:
                raise _unavailable(exc) from exc
            result = results[len(first)]
            if isinstance(result, rx.NoScriptError) and attempt == 1:
                # Redis restarted, or a replica was promoted, and lost its script cache:
                # load and retry the script alone (the other commands already ran).
                first, extra = (), ()
                continue
            if isinstance(result, Exception):
                raise _unavailable(result) from result
            if waiting and not _acked(results[len(first) + 1], self.wait_replicas):
                if after:
                    await self._index(after)  # the script ran: its index entries belong with it
                raise NotReplicated("budget store not replicated in time; request not served")
            if after:
                await self._index(after)
            self._observe(name, time.perf_counter() - started)
            return result
        raise ServiceUnavailable("budget store unavailable")

    async def _send(self, commands: list[tuple[Any, ...]], *, wait_on: str | None = None) -> list[Any]:
        """The commands' replies in order, errors among them; one round trip (on a cluster,
        one per node). `wait_on`: the key whose master a WAIT among them goes to, on the
        connection of the script before it."""
        if self._wire is not None:
            return await self._wire.execute(commands)
        node = self._node_of(wait_on) if self.cluster and wait_on is not None else None
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in commands:
                if node is not None and command[0] == "WAIT":
                    pipe.execute_command(*command, target_nodes=node)
                else:
                    pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

    async def _index(self, commands: Sequence[tuple[Any, ...]]) -> None:
        """Cluster: the index writes of a script that ran. One that fails is logged: the
        session's journal and counters (the truth) are in place; a report may miss it."""
        try:
            results = await self._send(list(commands))
        except REDIS_ERRORS as exc:
            results = [exc]
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            log.warning("an index write failed (%s); the session's journal and counters are intact", type(failed).__name__)

    async def _commands(self, commands: Sequence[tuple[Any, ...]]) -> None:
        try:
            results = await self._send(list(commands))
        except REDIS_ERRORS as exc:
            raise _unavailable(exc) from exc
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise _unavailable(failed) from failed

    def _node_of(self, key: str) -> Any:
        assert isinstance(self.redis, RedisCluster)
        return self.redis.get_node_from_key(key)

    def _shard(self, session_id: str) -> int:
        return keys.shard_of(session_id, self.shards)

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
        if tenant_limited and self.tenant_holds:
            assert tenant is not None
            return await self._reserve_held(
                TenantHold(tenant, _day(now), minute, now_ms), session_id=session_id, request_id=request_id,
                est_nanos=est_nanos, est_tokens=est_tokens, step_candidates=step_candidates, limits=limits,
                entry=entry, idempotency_key=idempotency_key, request_hash=request_hash, capped=capped,
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
        due = ("ZADD", keys.reservations_due(self._shard(session_id)), self.leases.deadline(now_ms, now_ms), f"{session_id}|{request_id}")
        try:
            if self.cluster:
                result = await self._run(keys.RESERVE_SCRIPT, script_keys, args, first=[due], wait=True)
            else:
                result = await self._run(keys.RESERVE_SCRIPT, script_keys, args, [due], wait=True)
        except ServiceUnavailable as exc:
            if _may_have_run(exc):
                self._release_later(session_id, tenant, entry)
            raise
        admission = _admission(result)
        if admission.held is None:
            self.leases.hold(session_id, request_id, Held(now_ms, idempotency_key))
        return admission

    async def _reserve_held(
        self, hold: TenantHold, *, session_id: str, request_id: str, est_nanos: int, est_tokens: int,
        step_candidates: str, limits: Limits, entry: Entry, idempotency_key: str | None, request_hash: str,
        capped: tuple[str, int] | None,
    ) -> Admission:
        """The two-slot reserve (Redis Cluster): hold the worst case on the tenant's slot,
        then reserve on the session's, with no tenant limit left for the session's script to
        check; give the hold back when the session refuses. The due entries of both sides are
        written first, so the reaper finds either whatever fails after."""
        now_ms = hold.reserved_ms
        key = (session_id, request_id)
        due = (
            "ZADD", keys.reservations_due(self._shard(session_id)),
            self.leases.deadline(now_ms, now_ms), f"{session_id}|{request_id}",
            # The hold is due after its reservation's backstop: a late settle up to then corrects both.
            now_ms + 2 * self.reservation_ttl_ms, keys.tenant_due(hold.tenant, session_id, request_id, now_ms),
        )
        await self._hold_tenant(hold, session_id, request_id, est_nanos, est_tokens, limits, due)
        # Stand-in keys in the session's slot, never read: the session's script sees no tenant limit.
        stand_ins = [keys.session_rate(session_id, f"t{u}", hold.minute) for u in ("usd", "req", "tok")]
        script_keys = [
            keys.session(session_id), keys.reservations(session_id), keys.journal(session_id),
            keys.journal_head(session_id), keys.session_rate(session_id, "req", hold.minute),
            keys.session_rate(session_id, "tok", hold.minute), *stand_ins,
            idempotency_key or keys.idempotency(session_id, "-"), keys.capped_calls(session_id),
        ]
        args = [
            now_ms, request_id, est_nanos, est_tokens, step_candidates, _opt(limits.session_rpm),
            _opt(limits.session_tpm), "", "", "", "" if idempotency_key is None else self.reservation_ttl_ms,
            request_hash, *(capped or ("", "")), now_ms + self.leases.lease_ms, self.owner,
            entry.digest, *entry.flat(),
        ]
        try:
            admission = _admission(await self._run(keys.RESERVE_SCRIPT, script_keys, args, wait=True))
        except ServiceUnavailable as exc:
            if _may_have_run(exc):
                # Settled at nothing later if it did run, and its hold with it (see _release).
                self._holds[key] = hold
                self._release_later(session_id, hold.tenant, entry)
            else:
                await self._close_hold(hold, session_id, request_id, 0, release=True)
            raise
        except asyncio.CancelledError:
            # Cancelled mid-call, the reserve may have run: giving the hold back now could
            # leave the session charged and the tenant not. Look later, as after a timeout.
            self._holds[key] = hold
            self._release_later(session_id, hold.tenant, entry)
            raise
        except BaseException:
            await self._close_hold(hold, session_id, request_id, 0, release=True)  # refused: give it back
            raise
        if admission.held is not None:  # an Idempotency-Key already in use: nothing was reserved
            await self._close_hold(hold, session_id, request_id, 0, release=True)
            return admission
        self._holds[key] = hold
        self.leases.hold(session_id, request_id, Held(now_ms, idempotency_key))
        return admission

    async def _hold_tenant(
        self, hold: TenantHold, session_id: str, request_id: str, est_nanos: int, est_tokens: int, limits: Limits,
        due: tuple[Any, ...],
    ) -> None:
        """Step one of the two-slot reserve: hold the worst case on the tenant's slot."""
        tenant_keys = [
            keys.tenant_spend(hold.tenant, hold.day),
            keys.tenant_rate(hold.tenant, "req", hold.minute),
            keys.tenant_rate(hold.tenant, "tok", hold.minute),
            keys.tenant_holds(hold.tenant),
        ]
        args = [
            hold.field(session_id, request_id), est_nanos, est_tokens, _opt(limits.tenant_rpm),
            _opt(limits.tenant_tpm), _opt(limits.tenant_usd_nanos_per_day), hold.day,
        ]
        result = await self._run(keys.TENANT_RESERVE_SCRIPT, tenant_keys, args, first=[due])
        status = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if status != "ok":
            with contextlib.suppress(ServiceUnavailable):  # else the reaper drops them, later
                await self._commands([("ZREM", due[1], due[3], due[5])])
            _admission(result)  # raises the refusal, shaped as the session script's
            raise ServiceUnavailable("unexpected answer from the budget store")

    async def _close_hold(self, hold: TenantHold, session_id: str, request_id: str, actual_nanos: int, *, release: bool) -> None:
        """Settle or give back a tenant hold; if Redis fails, the reaper closes it (charged in full)."""
        self._holds.pop((session_id, request_id), None)
        args = [hold.field(session_id, request_id), actual_nanos, "release" if release else "settle"]
        due = keys.tenant_due(hold.tenant, session_id, request_id, hold.reserved_ms)
        try:
            await self._run(keys.TENANT_SETTLE_SCRIPT, hold.keys(), args, [("ZREM", keys.reservations_due(self._shard(session_id)), due)])
        except ServiceUnavailable:
            log.warning("a tenant hold could not be closed; the reaper will charge it in full")

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
                    self._holds.pop((session_id, rid), None)  # the reaper closes the hold too
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
        hold = self._holds.pop((session_id, rid), None)
        if hold is not None:  # the session's reserve never ran: its tenant hold goes back
            await self._close_hold(hold, session_id, rid, 0, release=True)

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
        if not self._loaded:
            await self.load_scripts()
        by_shard: dict[int, list[Any]] = {}
        for i in range(0, len(scores), 2):
            by_shard.setdefault(self._shard(scores[i + 1].partition("|")[0]), []).extend(scores[i:i + 2])
        async with self.redis.pipeline(transaction=False) as pipe:
            # XX: a reservation settled (or closed) meanwhile is not brought back.
            for shard, pairs in by_shard.items():
                pipe.execute_command("ZADD", keys.reservations_due(shard), "XX", *pairs)
            for record, request_id, lease in records:
                pipe.execute_command("EVALSHA", self._sha[keys.LEASE_SCRIPT], 1, record, request_id, lease)
            results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, rx.NoScriptError) for r in results):
            self._loaded = False  # Redis lost its scripts (a restart, a promoted replica): loaded again next time

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
        if held is not None and not settlement.seq:
            # Our reservation is gone (lost in a failover, or taken over): nothing journaled, nothing served.
            raise ServiceUnavailable("this request's reservation was lost by the budget store; answer withheld")
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
            # With tenant holds, the tenant's counters are tenant_settle's: a stand-in in the session's slot.
            keys.session_rate(session_id, "tusd", 0) if self.tenant_holds else keys.tenant_spend(job.tags.tenant, _day(now)),
            job.record or keys.idempotency(session_id, "-"),
        ]
        args = [
            job.request_id, job.actual_nanos, job.actual_tokens, "1" if job.advance else "0",
            "" if job.reserved_ms is None else job.reserved_ms, *_record_args(job),
            job.entry.digest, *job.entry.flat(),
        ]
        extra = self._index_commands(job.entry, job.tags, job.actual_nanos, now)
        result = await self._run(keys.SETTLE_SCRIPT, script_keys, args, () if retried else extra, wait=True)
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
        hold = self._holds.get((session_id, job.request_id))
        if hold is not None:  # the tenant's side, once the session's is settled
            await self._close_hold(hold, session_id, job.request_id, job.actual_nanos, release=False)
        return settlement

    async def _write_deferred(self, job: Deferred) -> None:
        settlement = await self._settle(job, retried=True)
        self.leases.drop(job.session_id, job.request_id)
        if settlement.seq:
            log.info("wrote a settlement deferred while Redis was unavailable")

    def _index_commands(self, entry: Entry, tags: CostTags, nanos: int, now: float) -> list[tuple[Any, ...]]:
        bucket = _hour_bucket(now)
        shard = self._shard(tags.session_id)
        rollup = keys.cost_rollup(bucket, shard)
        min_id = int(now * 1000) - self.index_retention_ms
        kind = entry.fields.get(b"kind", b"")
        commands: list[tuple[Any, ...]] = [
            ("ZREM", keys.reservations_due(shard), f"{tags.session_id}|{request_id_of(entry)}"),
            ("XADD", keys.journal_index(shard), "MINID", "~", min_id, "*",
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
        extra = [("ZREM", keys.reservations_due(self._shard(session_id)), f"{session_id}|{request_id}")]
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
        extra = [("ZREM", keys.reservations_due(self._shard(session_id)), f"{session_id}|{request_id}")]
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

    async def reap_hold(self, tenant: str, session_id: str, request_id: str, reserved_ms: int) -> bool:
        """Close a tenant hold nobody will settle (its reservation is closed, settled or was
        never made): it stays charged in full, the conservative side. Running it twice changes nothing."""
        field = keys.tenant_hold(session_id, request_id, reserved_ms)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(keys.tenant_holds(tenant), field)
                pipe.zrem(keys.reservations_due(self._shard(session_id)), keys.tenant_due(tenant, session_id, request_id, reserved_ms))
                removed, _ = await pipe.execute()
        except REDIS_ERRORS as exc:
            raise _unavailable(exc) from exc
        return bool(removed)


# Denial tallies are for the dashboard's recent history, not an audit record (the journal is).
DENIAL_TALLY_TTL_S = 35 * 24 * 3600


def denial_tally(reason: str, now: float) -> list[tuple[Any, ...]]:
    """Commands counting one denial in its hour's rollup, by reason."""
    rollup = keys.denial_rollup(_hour_bucket(now))
    return [("HINCRBY", rollup, reason, 1), ("EXPIRE", rollup, DENIAL_TALLY_TTL_S)]


def request_id_of(entry: Entry) -> str:
    return entry.fields.get(b"rid", b"").decode()


def _acked(answer: Any, replicas: int) -> bool:
    """WAIT's answer: at least `replicas` replicas have the writes before it."""
    return not isinstance(answer, Exception) and int(answer) >= replicas


def _opt(v: int | None) -> str:
    return "" if v is None else str(v)


def _may_have_run(exc: ServiceUnavailable) -> bool:
    """A reserve that failed this way may have run in Redis all the same."""
    return isinstance(exc, NotReplicated) or isinstance(exc.__cause__, (rx.TimeoutError, rx.ConnectionError, TimeoutError))


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
