"""Assemblies in Redis: written once under their content hash, verified on every load.

Assemblies are immutable, so a loaded one is cached in-process by id for good
(bounded, least recently used first out).
"""

from __future__ import annotations

import asyncio
import builtins
import re
import time
from collections import OrderedDict
from collections.abc import Callable

from pydantic import ValidationError

from gateway import redis_keys
from gateway.assembly.model import Assembly, assembly_id
from gateway.errors import GatewayError, NotFound
from gateway.redis_client import AnyRedis

__all__ = ["AssemblyIntegrityError", "AssemblyStore"]

_ID = re.compile(r"asm_[0-9a-f]{32}")


class AssemblyIntegrityError(GatewayError):
    """The stored bytes no longer hash to their id, or no longer parse: never serve them."""

    status = 500
    type = "server_error"
    code = "assembly_integrity"


class AssemblyStore:
    def __init__(
        self,
        redis_client: AnyRedis,
        *,
        cache_size: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis_client
        self._cache: OrderedDict[str, Assembly] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock

    async def put(self, assembly: Assembly) -> bool:
        """Store `assembly`; False when its id was already stored (content is then identical)."""
        data = assembly.canonical_json()
        asm_id = assembly_id(data)
        # Not a MULTI: the two keys live in different cluster slots. ZADD NX always runs,
        # so a put cut off between the two commands is repaired by the next put.
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(redis_keys.assembly(asm_id), data, nx=True)
        pipe.zadd(redis_keys.ASSEMBLIES, {asm_id: self._clock()}, nx=True)
        created, _ = await asyncio.shield(pipe.execute())
        return bool(created)

    async def get(self, asm_id: str) -> Assembly:
        cached = self._cache.get(asm_id)
        if cached is not None:
            self._cache.move_to_end(asm_id)
            return cached
        # A malformed id can't name a stored assembly: no need to ask Redis.
        data = await self._redis.get(redis_keys.assembly(asm_id)) if _ID.fullmatch(asm_id) else None
        if data is None:
            raise NotFound(
                f"no assembly {asm_id!r}", param="assembly_id", code="assembly_not_found"
            )
        raw = data.encode() if isinstance(data, str) else data
        if assembly_id(raw) != asm_id:
            raise AssemblyIntegrityError(f"stored assembly {asm_id} does not match its hash")
        try:
            assembly = Assembly.model_validate_json(raw)
        except ValidationError:
            raise AssemblyIntegrityError(f"stored assembly {asm_id} cannot be read") from None
        self._remember(asm_id, assembly)
        return assembly

    async def list(self, limit: int = 100) -> builtins.list[str]:
        """Ids of stored assemblies, most recently first compiled first."""
        if limit <= 0:
            return []
        ids = await self._redis.zrange(redis_keys.ASSEMBLIES, 0, limit - 1, desc=True)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def _remember(self, asm_id: str, assembly: Assembly) -> None:
        self._cache[asm_id] = assembly
        self._cache.move_to_end(asm_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
