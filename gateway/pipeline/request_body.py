"""A request body from its bytes: strict JSON, an object, nested at most MAX_DEPTH levels,
and no key twice in any object (the journal keeps the raw bytes, and an auditor reading
the first of two "model" keys must not see a model that was never the one served).
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

from gateway.errors import InvalidRequest
from gateway.pipeline.request_fields import show

__all__ = ["MAX_DEPTH", "parse_body"]

# orjson reads 1024 levels but writes only 254, and every body is written again (journal,
# request hash, upstream); deeper ones are refused here rather than failing later as a 500.
MAX_DEPTH: Final = 128
# Every escape that may decode to ':' (\u003a or \u003A) starts so; so do a few others.
_ESCAPE_PREFIX: Final = b"\\u003"


def parse_body(raw: bytes) -> dict[str, Any]:
    """`raw` parsed, or InvalidRequest: malformed, not an object, too deep, or a duplicate key."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("malformed JSON body", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    # Counting brackets is C-speed; only a body with that many containers is walked.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _too_deep(body):
        message = f"the request body is nested deeper than {MAX_DEPTH} levels"
        raise InvalidRequest(message, code="invalid_json")
    if _may_repeat_a_key(raw, body):
        where = _first_duplicate(raw)
        if where is not None:
            where = show(where, 128)
            message = f"duplicate key '{where}' in the request body"
            raise InvalidRequest(message, param=where, code="duplicate_key")
    return body


def _may_repeat_a_key(raw: bytes, body: dict[str, Any]) -> bool:
    """False only when no object in `raw` has a key twice; True means "look closer".

    Outside strings, every ':' in JSON separates one key from its value, so `raw` holds
    (key-value pairs sent) + (literal colons inside strings) of them. Serialising the parsed
    body again gives (pairs kept) + (colons in the strings kept), since orjson never escapes
    ':'. A repeated key drops at least one pair (and whatever its first value held), so the
    second count falls below the first; only a colon sent as the escape \\u003a, which the
    parse turns into a literal one, can make up for that, and such escapes are counted on
    the raw side as well (generously: every `\\u003` and `\\\\u003`, which only costs a
    closer look). C-speed passes instead of a Python hook on every object of every request.
    """
    sent = raw.count(b":") + raw.count(_ESCAPE_PREFIX)
    return sent != orjson.dumps(body).count(b":")


class _Repeated:
    """What an object with a repeated key parses to in the slow path: the key, found later."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any] | _Repeated:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            return _Repeated(key)
        out[key] = value
    return out


def _first_duplicate(raw: bytes) -> str | None:
    """Where the first repeated key is, as a param path (`messages[0].role`), or None."""
    # orjson accepted `raw`, so it is strict JSON nested at most MAX_DEPTH levels: the
    # standard parser reads it the same way, and reports each object's pairs in order.
    tree = json.loads(raw, object_pairs_hook=_no_repeats)
    stack: list[tuple[Any, str]] = [(tree, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Repeated):
            return f"{path}.{node.key}" if path else node.key
        if isinstance(node, dict):
            prefix = f"{path}." if path else ""
            stack.extend((child, prefix + key) for key, child in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(node))))
    return None


def _too_deep(body: dict[str, Any]) -> bool:
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
