"""Plan versions and their lineage.

Compiling a plan through the admin API records the Assembly as the plan's next version
(by `name`), with its parent (the Assembly of the version before), who compiled it (the
admin token's label, and the actor the caller named, if any) and when. Recompiling the
plan of the newest version records nothing; compiling an older plan again is a new
version (a revert), so the lineage reads in the order things happened.

How many sessions ran on each Assembly is counted when each session opens (see
gateway/sessions.py), in the plan's own slot.
"""

from __future__ import annotations

import builtins
import dataclasses
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson

from gateway import redis_keys as keys
from gateway.assembly.model import Assembly
from gateway.assembly.plan import Plan
from gateway.decision.planfile import plan_data, plan_from_assembly
from gateway.errors import NotFound
from gateway.redis_client import AnyRedis

__all__ = ["PlanVersions", "Version"]


@dataclass(frozen=True, slots=True)
class Version:
    version: int
    assembly_id: str
    parent: str | None
    compiled_by: str
    compiled_at_ms: int
    actor: str | None = None
    sessions: int = 0

    @classmethod
    def parse(cls, raw: bytes | str) -> Version:
        data = orjson.loads(raw)
        return cls(
            version=int(data["version"]),
            assembly_id=str(data["assembly_id"]),
            parent=data.get("parent") or None,
            compiled_by=str(data.get("compiled_by", "")),
            compiled_at_ms=int(data.get("compiled_at_ms", 0)),
            actor=data.get("actor") or None,
        )

    def to_dict(self) -> dict[str, Any]:
        at = datetime.fromtimestamp(self.compiled_at_ms / 1000, UTC)
        return {
            "version": self.version,
            "assembly_id": self.assembly_id,
            "parent": self.parent,
            "compiled_by": self.compiled_by,
            "actor": self.actor,
            "compiled_at": at.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "sessions": self.sessions,
        }


class PlanVersions:
    def __init__(self, redis: AnyRedis) -> None:
        self._redis = redis
        source = (resources.files("gateway") / "lua" / f"{keys.PLAN_VERSION_SCRIPT}.lua").read_text("utf-8")
        # RedisCluster has it too (redis-py types it for Redis only); its NOSCRIPT reload goes to every master.
        self._record = redis.register_script(source)  # type: ignore[misc]

    async def record(
        self, plan: Plan, assembly: Assembly, *, by: str, actor: str | None = None, now_ms: int | None = None
    ) -> tuple[Version, bool]:
        """The version `assembly` is (new, True) or already was as the newest (False)."""
        at = now_ms if now_ms is not None else int(time.time() * 1000)
        name = assembly.name
        created, raw = await self._record(
            keys=[keys.plan_versions(name), keys.plan_sources(name)],
            args=[assembly.id, by, actor or "", str(at), orjson.dumps(plan_data(plan))],
        )
        return Version.parse(raw), bool(int(created))

    async def list(self, name: str) -> list[Version]:
        """Every version, oldest first, each with the sessions opened on its Assembly."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lrange(keys.plan_versions(name), 0, -1)
            pipe.hgetall(keys.plan_session_counts(name))
            records, counts = await pipe.execute()
        if not records:
            raise NotFound(f"no versions of plan {name!r}", param="name", code="plan_not_found")
        opened = {k.decode(): int(v) for k, v in counts.items()}
        found = [Version.parse(raw) for raw in records]
        return [dataclasses.replace(v, sessions=opened.get(v.assembly_id, 0)) for v in found]

    async def head(self, name: str) -> Version:
        return (await self.list(name))[-1]

    async def plan_of(self, assembly: Assembly) -> dict[str, Any]:
        """The plan that compiled to `assembly`: as stored with its version, else rebuilt."""
        raw = await self._redis.hget(keys.plan_sources(assembly.name), assembly.id)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
        if raw is None:
            return plan_from_assembly(assembly)
        plan: dict[str, Any] = orjson.loads(raw)
        return plan

    async def sessions(self, name: str, *, since_ms: int | None = None) -> builtins.list[str]:
        """Ids of the sessions opened on the plan's Assemblies, oldest first."""
        low = "-inf" if since_ms is None else since_ms
        found = await self._redis.zrangebyscore(keys.plan_sessions(name), low, "+inf")
        return [s.decode() if isinstance(s, bytes) else str(s) for s in found]
