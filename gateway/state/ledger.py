"""The Redis side of every request: reserve, settle, reap and journal, as versioned Lua.

Each script touches the keys of one hash slot only: the session's (`{sess:ID}`) or, for
tenant limits, the tenant's (`{ten:NAME}`). On one Redis node a call is one round trip:
the script plus, in the same pipeline, the writes to the sharded global indexes. On
Redis Cluster the index write a reservation needs to be found again (its due entry) goes
first, then the script, then the other index writes, on the nodes that hold them.
Any Redis trouble becomes `ServiceUnavailable`: callers fail closed and nothing is forwarded.

Tenant limits span two slots, so they are a protocol of two scripts (README: "Tenant
limits"): hold the worst case on the tenant's slot, then reserve on the session's; give
the hold back if the session refuses; settle both; the reaper closes what nobody settles.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

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
from gateway.state.entries import Entry, Kind, make_entry

SCRIPT_NAMES = (
    keys.RESERVE_SCRIPT,
    keys.SETTLE_SCRIPT,
    keys.JOURNAL_APPEND_SCRIPT,
    keys.REAP_SCRIPT,
    keys.REPLAY_TAKE_SCRIPT,
    keys.TENANT_RESERVE_SCRIPT,
    keys.TENANT_SETTLE_SCRIPT,
)
# RedisClusterException is no RedisError: the cluster client raises it when no node covers a slot.
REDIS_ERRORS = (rx.RedisError, rx.RedisClusterException, OSError, TimeoutError)
log = logging.getLogger("gateway.ledger")
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


@dataclass(frozen=True, slots=True)
class TenantHold:
    """A tenant hold this process made and has yet to settle: where its counters are."""

    tenant: str
    day: str
    minute: int

    def keys(self) -> list[str]:
        return [
            keys.tenant_holds(self.tenant),
            keys.tenant_spend(self.tenant, self.day),
            keys.tenant_rate(self.tenant, "req", self.minute),
            keys.tenant_rate(self.tenant, "tok", self.minute),
        ]


class Ledger:
    def __init__(
        self,
        redis: AnyRedis,
        *,
        reservation_ttl_s: int,
        journal_retention_s: int,
        shards: int = keys.DEFAULT_SHARDS,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.redis = redis
        self.cluster = isinstance(redis, RedisCluster)
        self.shards = shards
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._observe = observe or (lambda op, seconds: None)
        # Tenant holds of requests in flight here, by (session, request): settle closes them.
        self._holds: dict[tuple[str, str], TenantHold] = {}
        self._last_bucket = ""  # the hour bucket this process last registered in COST_BUCKETS
        self.reservation_ttl_ms = reservation_ttl_s * 1000
        self.index_retention_ms = journal_retention_s * 1000
        self._sources = _load_sources()
        # A script's SHA1 is known without asking Redis, so concurrent requests never race
        # over a cache of them; Redis is (re)taught the sources when it answers NOSCRIPT.
        self._sha = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in self._sources.items()}
        self._loaded = False
        self._releases: set[asyncio.Task[None]] = set()

    async def load_scripts(self, node: Any = None) -> None:
        """Teach Redis the scripts: every master, or (cluster) the one `node` that answered NOSCRIPT,
        e.g. a replica just promoted, which the client may not list among the masters yet."""
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

        `first` must be written before the script runs (a reservation's due entry, so the
        reaper can always find it); on a cluster, `extra` goes after it ran. `wait`: the
        script's writes must reach `wait_replicas` replicas before we answer (WAIT, on the
        script's own connection).
        """
        started = time.perf_counter()
        after: Sequence[tuple[Any, ...]] = ()
        if self.cluster:
            # Slots on other nodes are written in order around the script, never beside it:
            # a due entry removed while its settle failed would hide a reservation for good.
            if first:
                await self._commands(first)
            first, extra, after = (), (), extra
        for attempt in (1, 2):
            try:
                if not self._loaded:
                    await self.load_scripts()
                elif attempt == 2:
                    await self.load_scripts(self._node_of(keys_[0]) if self.cluster else None)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for command in first:
                        pipe.execute_command(*command)
                    pipe.execute_command("EVALSHA", self._sha[name], len(keys_), *keys_, *args)
                    if wait and self.wait_replicas:
                        # Same connection as the script: on a cluster, its slot's master.
                        where = {"target_nodes": self._node_of(keys_[0])} if self.cluster else {}
                        pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms, **where)
                    for command in extra:
                        pipe.execute_command(*command)
                    results = await pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as exc:
                raise ServiceUnavailable("budget store unavailable; request not forwarded") from exc
            result = results[len(first)]
            if isinstance(result, rx.NoScriptError) and attempt == 1:
                # Redis restarted, or a replica was promoted, and lost its script cache:
                # load and retry the script alone (the index commands already ran).
                first, extra = (), ()
                continue
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if failed is not None:
                raise ServiceUnavailable("budget store unavailable; request not forwarded") from (
                    result if isinstance(result, Exception) else failed
                )
            if wait and self.wait_replicas:
                acked = results[len(first) + 1]
                if int(acked) < self.wait_replicas:
                    raise ServiceUnavailable("budget store not replicated; answer withheld")
            if after:
                await self._index(after)
            self._observe(name, time.perf_counter() - started)
            return result
        raise ServiceUnavailable("budget store unavailable")

    async def _index(self, commands: Sequence[tuple[Any, ...]]) -> None:
        """Cluster: the index writes of a script that ran. One that fails is logged: the
        session's journal and counters (the truth) are in place; a report may miss it."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                results = await pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as exc:
            results = [exc]
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            log.warning("an index write failed (%s); the session's journal and counters are intact", type(failed).__name__)

    async def _commands(self, commands: Sequence[tuple[Any, ...]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                await pipe.execute()
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("budget store unavailable; request not forwarded") from exc

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
        now: float | None = None,
    ) -> Admission:
        """`idempotency_key` is the record's Redis key; with it, a held key wins over everything but
        the session's own state, and a new one is marked pending in the same step."""
        now = time.time() if now is None else now
        now_ms = int(now * 1000)
        minute = now_ms // 60000
        due_at = now_ms + self.reservation_ttl_ms
        due = ["ZADD", keys.reservations_due(self._shard(session_id)), due_at, f"{session_id}|{request_id}"]
        hold = None
        if tenant is not None and (limits.tenant_rpm or limits.tenant_tpm or limits.tenant_usd_nanos_per_day is not None):
            hold = TenantHold(tenant, _day(now), minute)
            due += [due_at, keys.tenant_due(tenant, session_id, request_id)]
            await self._hold_tenant(hold, session_id, request_id, est_nanos, est_tokens, limits, due)
        # Tenant limits are the tenant script's: the session's sees none, and stand-in keys
        # in the session's slot (never read) keep it to one slot.
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
            opt(limits.session_rpm), opt(limits.session_tpm), "", "", "",
            "" if idempotency_key is None else self.reservation_ttl_ms, request_hash,
            entry.digest, *entry.flat(),
        ]
        try:
            result = await self._run(keys.RESERVE_SCRIPT, script_keys, args, first=[] if hold else [tuple(due)])
            admission = _admission(result)
        except ServiceUnavailable as exc:
            if isinstance(exc.__cause__, (rx.TimeoutError, rx.ConnectionError, TimeoutError)):
                # It may have run: a later look settles it at zero, and its tenant hold with it.
                if hold is not None:
                    self._holds[(session_id, request_id)] = hold
                self._release_later(session_id, tenant, entry)
            elif hold is not None:
                await self._close_hold(hold, session_id, request_id, 0, release=True)
            raise
        except asyncio.CancelledError:
            # Cancelled mid-call, the reserve may have run: giving the hold back now could
            # leave the session charged and the tenant not. Look later, as after a timeout.
            if hold is not None:
                self._holds[(session_id, request_id)] = hold
                self._release_later(session_id, tenant, entry)
            raise
        except BaseException:
            if hold is not None:  # refused: the tenant's hold goes back
                await self._close_hold(hold, session_id, request_id, 0, release=True)
            raise
        if hold is not None:
            if admission.held is None:
                self._holds[(session_id, request_id)] = hold
            else:  # an Idempotency-Key already in use: this request reserved nothing
                await self._close_hold(hold, session_id, request_id, 0, release=True)
        return admission

    async def _hold_tenant(
        self, hold: TenantHold, session_id: str, request_id: str, est_nanos: int, est_tokens: int, limits: Limits, due: list[Any]
    ) -> None:
        """Step one of a tenant-limited reserve: hold the worst case in the tenant's slot.
        The due entries of both steps are written first, so the reaper finds either side."""

        def opt(v: int | None) -> str:
            return "" if v is None else str(v)

        tenant_keys = [
            keys.tenant_spend(hold.tenant, hold.day),
            keys.tenant_rate(hold.tenant, "req", hold.minute),
            keys.tenant_rate(hold.tenant, "tok", hold.minute),
            keys.tenant_holds(hold.tenant),
        ]
        args = [
            keys.tenant_hold(session_id, request_id), est_nanos, est_tokens,
            opt(limits.tenant_rpm), opt(limits.tenant_tpm), opt(limits.tenant_usd_nanos_per_day), hold.day,
        ]
        result = await self._run(keys.TENANT_RESERVE_SCRIPT, tenant_keys, args, first=[tuple(due)])
        status = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if status != "ok":
            _admission(result)  # raises the refusal, shaped as the session script's
            raise ServiceUnavailable("unexpected answer from the budget store")

    async def _close_hold(self, hold: TenantHold, session_id: str, request_id: str, actual_nanos: int, *, release: bool) -> None:
        """Settle or give back a tenant hold; if Redis fails, the reaper closes it (charged in full)."""
        self._holds.pop((session_id, request_id), None)
        try:
            await self._run(
                keys.TENANT_SETTLE_SCRIPT, hold.keys(),
                [keys.tenant_hold(session_id, request_id), actual_nanos, "release" if release else "settle"],
            )
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
                if held.startswith(b"R"):
                    self._holds.pop((session_id, rid), None)  # the reaper closes the hold too
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
        hold = self._holds.pop((session_id, rid), None)
        if hold is not None:  # the session's reserve never ran: its tenant hold goes back
            await self._close_hold(hold, session_id, rid, 0, release=True)

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
            # The tenant's counters are tenant_settle's; a never-charged stand-in in the session's slot.
            keys.session_rate(session_id, "tusd", 0),
        ]
        args = [request_id, actual_nanos, actual_tokens, "1" if advance else "0", entry.digest, *entry.flat()]
        extra = self._index_commands(entry, tags, actual_nanos, now)
        hold = self._holds.pop((session_id, request_id), None)
        if hold is not None:
            hold_keys = hold.keys()
            extra.append((
                "EVALSHA", self._sha[keys.TENANT_SETTLE_SCRIPT], len(hold_keys), *hold_keys,
                keys.tenant_hold(session_id, request_id), actual_nanos, "settle",
            ))
        result = await self._run(keys.SETTLE_SCRIPT, script_keys, args, extra, wait=True)
        return Settlement(budget_left_nanos=int(result[0]), seq=int(result[1]))

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

    async def append(self, session_id: str, entry: Entry, *, step: str = "", set_field: tuple[str, str] | None = None) -> int | None:
        """Journal one entry outside a request's reserve/settle (denials, state changes)."""
        field, value = set_field or ("", "")
        script_keys = [keys.journal(session_id), keys.journal_head(session_id), keys.session(session_id)]
        result = await self._run(keys.JOURNAL_APPEND_SCRIPT, script_keys, [entry.digest, step, field, value, *entry.flat()])
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
        extra = [("ZREM", keys.reservations_due(self._shard(session_id)), f"{session_id}|{request_id}")]
        result = await self._run(keys.REAP_SCRIPT, script_keys, [request_id, reservation, entry.digest, *entry.flat()], extra)
        return bool(result)

    async def reap_hold(self, tenant: str, session_id: str, request_id: str) -> bool:
        """Close a tenant hold nobody will settle (its session's reservation is gone): it stays
        charged in full, the conservative side. Idempotent: two reapers change nothing more."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(keys.tenant_holds(tenant), keys.tenant_hold(session_id, request_id))
                pipe.zrem(keys.reservations_due(self._shard(session_id)), keys.tenant_due(tenant, session_id, request_id))
                removed, _ = await pipe.execute()
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("budget store unavailable") from exc
        return bool(removed)


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
