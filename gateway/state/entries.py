"""Journal entries: their fields, their content digest, and the chain link.

An entry's `digest` is SHA-256 over its content fields (everything but the chain
fields), computed here. The Lua scripts chain entries with
`hash = sha1hex(prev | seq | digest | step)`: Redis Lua has no SHA-256, and the
content itself stays protected by SHA-256; forging a link needs a SHA-1 second
preimage, not a collision. `verify_chain` recomputes both.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import orjson

# Set by the scripts, not part of the content digest.
CHAIN_FIELDS = frozenset({b"seq", b"prev", b"hash", b"digest", b"step"})


class Kind:
    REQUEST = "request"
    RESPONSE = "response"
    STREAM = "stream"
    DENIAL = "denial"
    ERROR = "error"
    STATE = "state"
    ABORTED = "aborted"


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, int):
        return str(value).encode()
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def digest(fields: Mapping[bytes, bytes]) -> str:
    """SHA-256 over the content fields, sorted, each as `len(key):key=len(value):value`."""
    if not CHAIN_FIELDS.isdisjoint(fields):
        fields = {key: value for key, value in fields.items() if key not in CHAIN_FIELDS}
    # Every field is framed by C-level iteration (two entries a request, a dozen fields each).
    names = sorted(fields)
    values = list(map(fields.__getitem__, names))
    framed = map(_FRAME, zip(map(len, names), names, map(len, values), values))
    return hashlib.sha256(b"".join(framed)).hexdigest()


_FRAME = b"%d:%s=%d:%s".__mod__


def link(prev: str, seq: int | str, content_digest: str, step: str) -> str:
    return hashlib.sha1(f"{prev}|{seq}|{content_digest}|{step}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """Content of one entry, ready for a script: flat field list plus its digest."""

    fields: dict[bytes, bytes]
    digest: str

    def flat(self) -> list[bytes]:
        return list(chain.from_iterable(self.fields.items()))


# Field values by exact type (a bool is not written as an int); other types go through _b.
_ENCODERS: dict[type, Callable[[Any], bytes]] = {str: str.encode, int: b"%d".__mod__, bytes: bytes}


def make_entry(kind: str, *, body: bytes | None = None, compress_over: int = 4096, **fields: Any) -> Entry:
    """Build an entry; `body` is stored whole, zlib-compressed when larger than `compress_over`."""
    out: dict[bytes, bytes] = {b"kind": kind.encode()}
    for key, value in fields.items():
        if value is not None:
            out[key.encode()] = _ENCODERS.get(type(value), _b)(value)
    if body is not None:
        if len(body) > compress_over:
            out[b"body"] = zlib.compress(body, 1)
            out[b"enc"] = b"zlib"
        else:
            out[b"body"] = body
    return Entry(fields=out, digest=digest(out))


def entry_cost_nanos(fields: Mapping[bytes, bytes]) -> int:
    """What an entry charged; entries written before the unit was named say `cost`."""
    return int(fields.get(b"cost_nanos") or fields.get(b"cost") or 0)


def entry_body(fields: Mapping[bytes, bytes]) -> bytes | None:
    body = fields.get(b"body")
    if body is None:
        return None
    if fields.get(b"enc") == b"zlib":
        return zlib.decompress(body)
    return body


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    entries: int
    first_broken_seq: int | None = None
    first_broken_id: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "integrity": "ok" if self.ok else "broken",
            "entries": self.entries,
            "first_broken_seq": self.first_broken_seq,
            "first_broken_id": self.first_broken_id,
            "reason": self.reason,
        }


def verify_chain(
    entries: Iterable[tuple[bytes, Mapping[bytes, bytes]]], *, prev: str = "", first_seq: int = 1
) -> ChainReport:
    """Check every link and content digest in stream order, from the first entry, or from
    `first_seq` whose predecessor's hash is `prev` (a journal trimmed after export)."""
    expected_seq = first_seq
    count = 0
    for entry_id, fields in entries:
        count += 1
        seq = int(fields.get(b"seq", b"0"))
        why = None
        if seq != expected_seq:
            why = f"sequence {seq}, expected {expected_seq}"
        elif fields.get(b"prev", b"").decode() != prev:
            why = "prev does not match the previous entry's hash"
        elif digest(fields) != fields.get(b"digest", b"").decode():
            why = "content does not match its digest"
        else:
            step = fields.get(b"step", b"").decode()
            if link(prev, seq, fields[b"digest"].decode(), step) != fields.get(b"hash", b"").decode():
                why = "hash does not match prev, seq, digest and step"
        if why is not None:
            return ChainReport(False, count, seq, entry_id.decode(), why)
        prev = fields[b"hash"].decode()
        expected_seq += 1
    return ChainReport(True, count)
