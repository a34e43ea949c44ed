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
from redis.asyncio import Redis

from gateway import redis_keys as keys
from gateway.assembly.model import Assembly
from gateway.capability import Keyring, mint
from gateway.errors import InvalidRequest, NotFound
from gateway.journal.events import Kind, make_entry
from gateway.money import nanos_to_usd_str, usd_to_nanos
from gateway.pipeline.ledger import REDIS_ERRORS, Ledger

MAX_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Opened:
    session_id: str
    token: str
    expires_at: int
    budget_nanos: int | None


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class SessionStore:
    def __init__(self, redis: Redis, ledger: Ledger, keyring: Keyring, *, retention_s: int) -> None:
        self.redis = redis
        self.ledger = ledger
        self.keyring = keyring
        self.retention_s = retention_s

    async def open(
        self,
        assembly: Assembly,
        *,
        tenant: str | None,
        budget_usd: float | None,
        ttl_s: int | None,
        labels: dict[str, str],
        replay_of: str | None = None,
    ) -> Opened:
        budget = assembly.budget.usd_nanos
        if budget_usd is not None:
            wanted = usd_to_nanos(budget_usd)
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
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.session(session_id), mapping=fields)
                pipe.expireat(keys.session(session_id), keep_until)
                pipe.zadd(keys.SESSIONS, {session_id: now})
                await pipe.execute()
        except REDIS_ERRORS as exc:
            from gateway.errors import ServiceUnavailable

            raise ServiceUnavailable("session store unavailable") from exc
        entry = make_entry(
            Kind.STATE, event="opened", asm=assembly.id, tenant=tenant, budget=budget, ttl_s=ttl, replay_of=replay_of, ts=int(now * 1000)
        )
        await self.ledger.append(session_id, entry)
        await self._expire_journal(session_id, keep_until)
        return Opened(session_id, token, expires_at, budget)

    async def _expire_journal(self, session_id: str, keep_until: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in (keys.journal(session_id), keys.journal_head(session_id), keys.reservations(session_id)):
                pipe.expireat(key, keep_until)
            await pipe.execute()

    async def get(self, session_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.session(session_id))  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
        if not raw:
            raise NotFound(f"session {session_id!r} not found", code="session_not_found")
        return _decode(raw)

    async def show(self, session_id: str) -> dict[str, Any]:
        s = await self.get(session_id)
        spent, reserved = int(s.get("spent_nanos", 0)), int(s.get("reserved_nanos", 0))
        budget = int(s["budget_nanos"]) if "budget_nanos" in s else None
        expired = int(s["expires_at_ms"]) <= time.time() * 1000
        return {
            "session_id": session_id,
            "assembly_id": s["assembly_id"],
            "tenant": s["tenant"],
            "state": "revoked" if s["status"] == "revoked" else ("expired" if expired else "active"),
            "current_step": s.get("step") or None,
            "created_at": int(s["created_at_ms"]) // 1000,
            "expires_at": int(s["expires_at_ms"]) // 1000,
            "labels": orjson.loads(s.get("labels", "{}")),
            "replay_of": s.get("replay_of"),
            "requests": int(s.get("requests", 0)),
            "spent_usd": nanos_to_usd_str(spent),
            "reserved_usd": nanos_to_usd_str(reserved),
            "budget_usd": None if budget is None else nanos_to_usd_str(budget),
            "remaining_usd": None if budget is None else nanos_to_usd_str(budget - spent - reserved),
            "spent_nanos": spent,
            "reserved_nanos": reserved,
            "spent_tokens": int(s.get("spent_tokens", 0)),
            "reserved_tokens": int(s.get("reserved_tokens", 0)),
        }

    async def revoke(self, session_id: str) -> None:
        entry = make_entry(Kind.STATE, event="revoked", ts=int(time.time() * 1000))
        if await self.ledger.append(session_id, entry, set_field=("status", "revoked")) is None:
            raise NotFound(f"session {session_id!r} not found", code="session_not_found")
