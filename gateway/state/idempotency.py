"""Idempotency-Key: a retried request in the same session gets the first answer, byte for byte.

The reserve script looks the key up and marks it pending in the round trip that admits
the request, so a request without the header pays nothing. After settlement the answer
(status, headers, body; a stream as the exact bytes sent) is stored; a failed request
frees its key so a retry runs again. A duplicate arriving while the first is in flight
polls the record until the answer is there, and never calls upstream itself.

The same key with a different body is 422 (`idempotency_key_reused`); a duplicate still
waiting after WAIT_S gives up with 409 (`idempotency_key_in_use`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from gateway import redis_keys as keys
from gateway.errors import InvalidRequest, ServiceUnavailable, StateConflict
from gateway.redis_client import AnyRedis
from gateway.state.ledger import REDIS_ERRORS

if TYPE_CHECKING:
    from gateway.capability import Claims

log = logging.getLogger("gateway.idempotency")
HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
DONE_TTL_S = 24 * 3600
WAIT_S = 120.0
COMPRESS_OVER = 4096


@dataclass(frozen=True, slots=True)
class Stored:
    """The first answer to a keyed request, as its client received it."""

    status: int
    headers: dict[str, str]
    body: bytes


def key_of(header_value: str | None) -> str | None:
    if header_value is None:
        return None
    if not (0 < len(header_value) <= MAX_KEY_CHARS and header_value.isascii() and header_value.isprintable()):
        raise InvalidRequest(f"{HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters", param=HEADER)
    return header_value


def record_key(claims: Claims, idempotency_key: str) -> str:
    # Hashed: the client's key may be long or sensitive; the record only needs to find it.
    return keys.idempotency(claims.session_id, hashlib.sha256(idempotency_key.encode()).hexdigest())


async def await_answer(redis: AnyRedis, record: str, request_hash: str, held: dict[str, bytes]) -> Stored | None:
    """The first request's answer; None when the first failed and freed the key (run again)."""
    deadline = time.monotonic() + WAIT_S
    delay = 0.01
    while True:
        if held.get("req", b"").decode() != request_hash:
            raise InvalidRequest(
                f"this {HEADER} was used with a different request body", code="idempotency_key_reused", status=422
            )
        if held.get("state") == b"done":
            return _stored(held)
        if time.monotonic() > deadline:
            raise StateConflict(
                f"a request with this {HEADER} is still in progress; retry later", code="idempotency_key_in_use"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
        try:
            raw = await redis.hgetall(record)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("idempotency store unavailable") from exc
        if not raw:
            return None
        held = {k.decode(): v for k, v in raw.items()}


def _stored(held: dict[str, bytes]) -> Stored:
    body = held.get("body", b"")
    if held.get("enc") == b"zlib":
        body = zlib.decompress(body)
    headers = orjson.loads(held.get("headers", b"{}"))
    return Stored(int(held.get("status", b"200")), headers, body)


async def remember(redis: AnyRedis, record: str, stored: Stored) -> None:
    fields: dict[str, bytes | str | int] = {
        "state": "done", "status": stored.status, "headers": orjson.dumps(stored.headers), "body": stored.body,
    }
    if len(stored.body) > COMPRESS_OVER:
        fields["body"] = zlib.compress(stored.body, 1)
        fields["enc"] = "zlib"
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(record, mapping=fields)
            pipe.expire(record, DONE_TTL_S)
            await pipe.execute()
    except REDIS_ERRORS:
        # The answer still goes out; duplicates wait for the pending record to expire.
        log.warning("could not store an idempotent answer; its key stays pending until it expires")


async def forget(redis: AnyRedis, record: str) -> None:
    try:
        await redis.delete(record)
    except REDIS_ERRORS:
        log.warning("could not free an idempotency key; it stays pending until it expires")
