"""Sessions: open one on an Assembly (minting its VCS token), show it, revoke it.

A session is a Redis hash in the session's slot; budgets live there so the reserve
script checks revocation, expiry and money in one round trip.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import redis_keys as keys
from gateway.assembly.model import Assembly
from gateway.capability import Keyring, mint
from gateway.errors import InvalidRequest, NotFound
from gateway.money import nanos_to_usd_str
from gateway.redis_client import AnyRedis
from gateway.state.entries import Kind, make_entry
from gateway.state.ledger import REDIS_ERRORS, Ledger

MAX_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Opened:
    session_id: str
    token: str
    expires_at: int
    budget_nanos: int | None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session's hash, parsed in this one place."""

    session_id: str
    assembly_id: str
    tenant: str
    status: str
    created_at_ms: int
    expires_at_ms: int
    labels: dict[str, str]
    replay_of: str | None
    step: str | None
    requests: int
    spent_nanos: int
    reserved_nanos: int
    spent_tokens: int
    reserved_tokens: int
    budget_nanos: int | None

    @classmethod
    def parse(cls, session_id: str, raw: dict[bytes, bytes]) -> SessionRecord:
        s = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            session_id=session_id, assembly_id=s["assembly_id"], tenant=s["tenant"], status=s["status"],
            created_at_ms=int(s["created_at_ms"]), expires_at_ms=int(s["expires_at_ms"]),
            labels=orjson.loads(s.get("labels", "{}")), replay_of=s.get("replay_of"), step=s.get("step") or None,
            requests=int(s.get("requests", 0)),
            spent_nanos=int(s.get("spent_nanos", 0)), reserved_nanos=int(s.get("reserved_nanos", 0)),
            spent_tokens=int(s.get("spent_tokens", 0)), reserved_tokens=int(s.get("reserved_tokens", 0)),
            budget_nanos=int(s["budget_nanos"]) if "budget_nanos" in s else None,
        )

    @property
    def state(self) -> str:
        if self.status == "revoked":
            return "revoked"
        return "expired" if self.expires_at_ms <= time.time() * 1000 else "active"


class SessionStore:
    def __init__(self, redis: AnyRedis, ledger: Ledger, keyring: Keyring, *, retention_s: int) -> None:
        self.redis = redis
        self.ledger = ledger
        self.keyring = keyring
        self.retention_s = retention_s

    async def open(
        self,
        assembly: Assembly,
        *,
        tenant: str | None,
        budget_nanos: int | None,
        ttl_s: int | None,
        labels: dict[str, str],
        replay_of: str | None = None,
        plan_session: bool = True,
    ) -> Opened:
        """`plan_session=False`: not one of its plan's sessions for the decision plane (not
        counted on its version nor listed for suggestions), e.g. a live evaluation's."""
        budget = assembly.budget.usd_nanos
        if budget_nanos is not None:
            wanted = budget_nanos
            if wanted < 0 or (budget is not None and wanted > budget):
                raise InvalidRequest("budget_usd may be lower than the Assembly's budget, never higher", param="budget_usd")
            budget = wanted
        ttl = ttl_s if ttl_s is not None else assembly.ttl_s
        if not 0 < ttl <= MAX_TTL_S:
            raise InvalidRequest(f"ttl_s must be between 1 and {MAX_TTL_S}", param="ttl_s")
        if assembly.tenant is not None and tenant is not None and tenant != assembly.tenant:
            raise InvalidRequest("tenant differs from the Assembly's tenant", param="tenant")
        tenant = tenant or assembly.tenant or "default"
        session_id = "sess_" + secrets.token_hex(12)
        now = time.time()
        expires_at = int(now) + ttl
        token, _ = mint(
            self.keyring, session_id=session_id, assembly_id=assembly.id, tenant=tenant, ttl_s=ttl, now=now, replay_of=replay_of
        )
        fields: dict[str, Any] = {
            "assembly_id": assembly.id,
            "tenant": tenant,
            "status": "active",
            "created_at_ms": int(now * 1000),
            "expires_at_ms": expires_at * 1000,
            "labels": orjson.dumps(labels),
            "spent_nanos": 0, "reserved_nanos": 0, "spent_tokens": 0, "reserved_tokens": 0, "requests": 0,
        }
        if replay_of is not None:
            fields["replay_of"] = replay_of
        for name, value in (("budget_nanos", budget), ("budget_tokens", assembly.budget.tokens), ("budget_requests", assembly.budget.requests)):
            if value is not None:
                fields[name] = value
        keep_until = expires_at + self.retention_s
        try:
            # Not a MULTI: the session and the SESSIONS index live in different cluster slots.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(keys.session(session_id), mapping=fields)
                pipe.expireat(keys.session(session_id), keep_until)
                pipe.zadd(keys.SESSIONS, {session_id: now})
                await pipe.execute()
        except REDIS_ERRORS as exc:
            from gateway.errors import ServiceUnavailable

            raise ServiceUnavailable("session store unavailable") from exc
        if plan_session:
            await self._index_for_plan(assembly, session_id, now)
        entry = make_entry(
            Kind.STATE, event="opened", asm=assembly.id, tenant=tenant, budget=budget, ttl_s=ttl, replay_of=replay_of, ts=int(now * 1000)
        )
        await self.ledger.append(session_id, entry)
        await self._expire_journal(session_id, keep_until)
        return Opened(session_id, token, expires_at, budget)

    async def _index_for_plan(self, assembly: Assembly, session_id: str, now: float) -> None:
        """For the decision plane: the plan's sessions by open time, and the count per Assembly
        (one slot per plan). Ids older than any session could live are dropped as we go."""
        horizon = int((now - MAX_TTL_S - self.retention_s) * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.plan_sessions(assembly.name), {session_id: int(now * 1000)})
            pipe.zremrangebyscore(keys.plan_sessions(assembly.name), "-inf", horizon)
            pipe.hincrby(keys.plan_session_counts(assembly.name), assembly.id, 1)
            await pipe.execute()

    async def _expire_journal(self, session_id: str, keep_until: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in (keys.journal(session_id), keys.journal_head(session_id), keys.reservations(session_id)):
                pipe.expireat(key, keep_until)
            await pipe.execute()

    async def get(self, session_id: str) -> SessionRecord:
        raw = await self.redis.hgetall(keys.session(session_id))  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
        if not raw:
            raise NotFound(f"session {session_id!r} not found", code="session_not_found")
        return SessionRecord.parse(session_id, raw)

    async def show(self, session_id: str) -> dict[str, Any]:
        s = await self.get(session_id)
        budget = s.budget_nanos
        return {
            "session_id": session_id,
            "assembly_id": s.assembly_id,
            "tenant": s.tenant,
            "state": s.state,
            "current_step": s.step,
            "created_at": s.created_at_ms // 1000,
            "expires_at": s.expires_at_ms // 1000,
            "labels": s.labels,
            "replay_of": s.replay_of,
            "requests": s.requests,
            "spent_usd": nanos_to_usd_str(s.spent_nanos),
            "reserved_usd": nanos_to_usd_str(s.reserved_nanos),
            "budget_usd": None if budget is None else nanos_to_usd_str(budget),
            "remaining_usd": None if budget is None else nanos_to_usd_str(budget - s.spent_nanos - s.reserved_nanos),
            "spent_nanos": s.spent_nanos,
            "reserved_nanos": s.reserved_nanos,
            "spent_tokens": s.spent_tokens,
            "reserved_tokens": s.reserved_tokens,
        }

    async def revoke(self, session_id: str) -> None:
        entry = make_entry(Kind.STATE, event="revoked", ts=int(time.time() * 1000))
        if await self.ledger.append(session_id, entry, set_field=("status", "revoked")) is None:
            raise NotFound(f"session {session_id!r} not found", code="session_not_found")
