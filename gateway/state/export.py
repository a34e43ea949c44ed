"""Reading a session's journal out of Redis: pages of decoded entries for people, lossless
lines for archives, and trimming what an archive already holds.

An export line keeps every stored field exactly (text, or base64 for a compressed body),
so the chain of an archive can be verified offline with `verify_chain(lines_to_entries(...))`.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import orjson

from gateway import redis_keys as keys
from gateway.errors import InvalidRequest, StateConflict
from gateway.redis_client import AnyRedis
from gateway.state.entries import entry_body

PAGE = 1000
INT_FIELDS = frozenset({
    "seq", "est_nanos", "est_tokens", "tok_in", "tok_out", "cost", "cost_nanos", "gw_us", "up_us", "status",
    "ts", "chunks", "ttft_us", "tokens", "budget", "ttl_s",
})
BOOL_FIELDS = frozenset({"is_error", "stream"})
JSON_FIELDS = frozenset({"plugins"})  # what each policy plugin did, by plugin name

Raw = tuple[bytes, dict[bytes, bytes]]


async def read_page(redis: AnyRedis, session_id: str, *, after: str | None, limit: int) -> list[Raw]:
    """Up to `limit` entries after the entry id `after` (exclusive), oldest first."""
    start = "-" if not after else "(" + after
    page: list[Raw] = await redis.xrange(keys.journal(session_id), min=start, max="+", count=limit)
    return page


async def read_all(redis: AnyRedis, session_id: str) -> AsyncIterator[Raw]:
    after: str | None = None
    while True:
        page = await read_page(redis, session_id, after=after, limit=PAGE)
        for item in page:
            yield item
        if len(page) < PAGE:
            return
        after = page[-1][0].decode()


def decoded(entry_id: bytes, fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """An entry for people: numbers as numbers, the body decompressed and parsed when JSON."""
    out: dict[str, Any] = {"id": entry_id.decode()}
    for key, value in fields.items():
        name = key.decode()
        if name in ("body", "enc"):
            continue
        text = value.decode(errors="replace")
        if name in INT_FIELDS and text.lstrip("-").isdigit():
            out[name] = int(text)
        elif name in BOOL_FIELDS:
            out[name] = text == "1"
        elif name in JSON_FIELDS:
            out[name] = orjson.loads(value)
        else:
            out[name] = text
    body = entry_body(fields)
    if body is not None:
        try:
            out["body"] = orjson.loads(body)
        except orjson.JSONDecodeError:
            out["body"] = body.decode(errors="replace")  # a stream: its payloads, one per line
    return out


def export_line(entry_id: bytes, fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """An entry for archives: every stored field exactly as stored."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            out[key.decode()] = value.decode()
        except UnicodeDecodeError:
            out[key.decode()] = {"base64": base64.b64encode(value).decode()}
    return {"id": entry_id.decode(), "fields": out}


def lines_to_entries(lines: Iterable[dict[str, Any]]) -> list[Raw]:
    """Export lines back into stream entries, for `verify_chain`."""
    entries: list[Raw] = []
    for line in lines:
        fields = {
            k.encode(): base64.b64decode(v["base64"]) if isinstance(v, dict) else v.encode()
            for k, v in line["fields"].items()
        }
        entries.append((line["id"].encode(), fields))
    return entries


async def trim_through(redis: AnyRedis, session_id: str, *, through: str, exported_hash: str) -> dict[str, Any]:
    """Drop the entries up to and including `through`, which the caller has archived.

    `exported_hash` must be that entry's chain hash, as the archive holds it: proof that the
    archive reaches this far. The head remembers where the journal now starts, so `verify`
    checks the rest from there.
    """
    journal, head = keys.journal(session_id), keys.journal_head(session_id)
    found = await redis.xrange(journal, min=through, max=through) if is_entry_id(through) else []
    if not found:
        raise InvalidRequest(f"no journal entry {through!r} in session {session_id}", param="through")
    fields = found[0][1]
    if fields.get(b"hash", b"").decode() != exported_hash:
        raise StateConflict("exported_hash is not the hash of that entry: export again", code="trim_mismatch")
    seq = int(fields[b"seq"])
    trimmed = int(await redis.hget(head, "trimmed_seq") or 0)  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    if seq <= trimmed:
        return {"trimmed": 0, "first_seq": trimmed + 1}
    ms, _, n = through.partition("-")
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(head, mapping={"trimmed_seq": seq, "trimmed_hash": exported_hash})
        # MINID is exclusive of ids below it: the next possible id keeps everything after `through`.
        pipe.xtrim(journal, minid=f"{ms}-{int(n) + 1}", approximate=False)
        _, removed = await pipe.execute()
    return {"trimmed": int(removed), "first_seq": seq + 1}


def is_entry_id(value: str) -> bool:
    ms, dash, n = value.partition("-")
    return bool(dash) and ms.isdigit() and n.isdigit()
