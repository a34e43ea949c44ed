"""Stored Responses: which journal entry holds each stored response of a session, so
`GET /v1/responses/{id}` and `previous_response_id` read the journal, never a replica's
memory. Ids are per session: another session's id is simply not found (404).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway import redis_keys as keys
from gateway.errors import InvalidRequest, NotFound, ServiceUnavailable
from gateway.redis_client import AnyRedis
from gateway.state.entries import Kind, entry_body
from gateway.state.ledger import REDIS_ERRORS
from gateway.translate.responses import TERMINAL

# Turns followed back through previous_response_id; a longer chain is refused, not walked.
MAX_TURNS = 512
INPUT_FIELD = "resp_input"  # the turn's own input items, on the entry that answered it
PREVIOUS_FIELD = "resp_prev"


@dataclass(frozen=True, slots=True)
class Stored:
    response: dict[str, Any]
    raw: bytes  # the Response object's bytes as the client got them (a stream's: re-serialised)
    input: list[dict[str, Any]]
    previous: str | None


async def remember(redis: AnyRedis, session_id: str, response_id: str, entry_id: str, keep_until: int) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.responses(session_id), response_id, entry_id)
        pipe.expireat(keys.responses(session_id), keep_until)
        await pipe.execute()


async def load(redis: AnyRedis, session_id: str, response_id: object) -> Stored:
    if not isinstance(response_id, str) or not response_id:
        raise InvalidRequest("a response id must be a non-empty string", param="previous_response_id")
    try:
        entry_id = await redis.hget(keys.responses(session_id), response_id)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
        found = await redis.xrange(keys.journal(session_id), min=entry_id, max=entry_id) if entry_id else []
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("journal unavailable") from exc
    if not found:
        raise NotFound(f"response '{response_id[:64]}' not found in this session", code="response_not_found")
    fields = found[0][1]
    previous = fields.get(PREVIOUS_FIELD.encode(), b"").decode() or None
    response, raw = _response(fields)
    return Stored(response, raw, orjson.loads(fields.get(INPUT_FIELD.encode(), b"[]")), previous)


def _response(fields: dict[bytes, bytes]) -> tuple[dict[str, Any], bytes]:
    """The Response object a stored entry answered with: the body, or a stream's last event's."""
    body = entry_body(fields) or b"{}"
    if fields.get(b"kind") != Kind.STREAM.encode():
        return orjson.loads(body), body
    for payload in reversed(body.split(b"\n")):
        event = orjson.loads(payload)
        if isinstance(event, dict) and event.get("type") in TERMINAL:
            response: dict[str, Any] = event["response"]
            return response, orjson.dumps(response)
    raise NotFound("the stored response has no final event", code="response_not_found")


async def history(redis: AnyRedis, session_id: str, previous_id: object) -> list[dict[str, Any]]:
    """Every input and output item of the conversation ending at `previous_id`, oldest first."""
    if previous_id is None:
        return []
    turns: list[Stored] = []
    while previous_id is not None:
        if len(turns) == MAX_TURNS:
            raise InvalidRequest(f"conversation longer than {MAX_TURNS} turns", param="previous_response_id")
        turn = await load(redis, session_id, previous_id)
        turns.append(turn)
        previous_id = turn.previous
    items: list[dict[str, Any]] = []
    for turn in reversed(turns):
        items.extend(turn.input)
        items.extend(item for item in turn.response.get("output") or [] if isinstance(item, dict))
    return items
