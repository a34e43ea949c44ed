"""Idempotency-Key: a retried request in the same session gets the first answer, byte for byte.

The reserve script looks the key up and marks it pending in the round trip that admits
the request, so a request without the header pays nothing. The settle step stores the
answer (status, headers, body; a stream as the exact bytes sent), so no crash can leave
a request charged with no answer for its retry; a failed request's settle step frees
its key so a retry runs again. A duplicate arriving while the
first is in flight polls the record until the answer is there, and never calls upstream
itself while the first is alive.

A pending record carries its owner and a lease the owner renews while it works (see
`leases`). A duplicate that finds the lease run out takes the request over at once: the
dead attempt is closed (`aborted`, charged nothing) and the key freed in one script, and
the duplicate runs the request; of several duplicates, one does and the rest wait for it.

The same key with a different body is 422 (`idempotency_key_reused`); a duplicate of a
live first still waiting after `wait_s` gets 409 (`idempotency_key_in_use`) with Retry-After.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from typing import TYPE_CHECKING

import orjson

from gateway import redis_keys as keys
from gateway.errors import InvalidRequest, ServiceUnavailable, StateConflict
from gateway.money import nanos_to_usd_str
from gateway.state.ledger import REDIS_ERRORS, Ledger, Stored

if TYPE_CHECKING:
    from gateway.capability import Claims

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
RETRY_AFTER_S = 1
__all__ = ["HEADER", "Stored", "await_answer", "key_of", "record_key"]


def key_of(header_value: str | None) -> str | None:
    if header_value is None:
        return None
    if not (0 < len(header_value) <= MAX_KEY_CHARS and header_value.isascii() and header_value.isprintable()):
        raise InvalidRequest(f"{HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters", param=HEADER)
    return header_value


def record_key(claims: Claims, idempotency_key: str) -> str:
    # Hashed: the client's key may be long or sensitive; the record only needs to find it.
    return keys.idempotency(claims.session_id, hashlib.sha256(idempotency_key.encode()).hexdigest())


async def await_answer(
    ledger: Ledger, session_id: str, record: str, request_hash: str, held: dict[str, bytes], *, wait_s: float
) -> Stored | None:
    """The first request's answer; None when the key is free again (the first failed, or
    its process died and we took it over): run the request."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        if held.get("req", b"").decode() != request_hash:
            raise InvalidRequest(
                f"this {HEADER} was used with a different request body", code="idempotency_key_reused", status=422
            )
        if held.get("state") == b"done":
            return _stored(held)
        if _lease_ran_out(held):
            await ledger.take_over(session_id, record, held.get("rid", b"").decode())
            return None  # taken over, by us or a concurrent duplicate: the next reserve says who runs it
        if time.monotonic() > deadline:
            raise StateConflict(
                f"a request with this {HEADER} is still in progress; retry later",
                code="idempotency_key_in_use", extra={"retry_after_s": RETRY_AFTER_S},
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
        try:
            raw = await ledger.redis.hgetall(record)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("idempotency store unavailable") from exc
        if not raw:
            return None
        held = {k.decode(): v for k, v in raw.items()}


def _lease_ran_out(held: dict[str, bytes]) -> bool:
    # A record written before leases existed has none: it is waited for, as it was then.
    lease = held.get("lease")
    return held.get("state") == b"pending" and lease is not None and int(lease) < time.time() * 1000


def _stored(held: dict[str, bytes]) -> Stored:
    body = held.get("body", b"")
    if held.get("enc") == b"zlib":
        body = zlib.decompress(body)
    headers = orjson.loads(held.get("headers", b"{}"))
    left = int(held.get("left", b"-1"))
    if left >= 0:
        headers["x-abc-budget-remaining-usd"] = nanos_to_usd_str(left)
    return Stored(int(held.get("status", b"200")), headers, body)
