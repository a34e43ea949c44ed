"""What the dialect translators share: usage counts as dialects report them, stop
reasons, deterministic ids, and the SSE framing of typed events."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class Tokens:
    """Usage as an upstream reported it; `cached` is part of `prompt`, `reasoning` of `completion`."""

    prompt: int
    completion: int
    cached: int = 0
    reasoning: int = 0


def chat_tokens(usage: object) -> Tokens | None:
    """Tokens from a chat completion's (or usage chunk's) `usage`, when it has counts."""
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return None
    cached = as_dict(usage.get("prompt_tokens_details")).get("cached_tokens")
    reasoning = as_dict(usage.get("completion_tokens_details")).get("reasoning_tokens")
    return Tokens(usage["prompt_tokens"], _count(usage.get("completion_tokens")), _count(cached), _count(reasoning))


def response_tokens(usage: object) -> Tokens | None:
    """Tokens from a Response object's `usage` (OpenAI Responses), when it has counts."""
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int):
        return None
    cached = as_dict(usage.get("input_tokens_details")).get("cached_tokens")
    return Tokens(usage["input_tokens"], _count(usage.get("output_tokens")), _count(cached))


def message_tokens(usage: object) -> Tokens | None:
    """Tokens from a Message's `usage` (Anthropic), when it has counts: cache reads and
    writes, which it counts apart from `input_tokens`, are input too."""
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int):
        return None
    cached = _count(usage.get("cache_read_input_tokens"))
    prompt = usage["input_tokens"] + cached + _count(usage.get("cache_creation_input_tokens"))
    return Tokens(prompt, _count(usage.get("output_tokens")), cached)


def _count(value: object) -> int:
    """A count as an upstream reported it; absent or not an integer reads as 0."""
    return value if isinstance(value, int) else 0


def derived_id(prefix: str, *parts: str, length: int = 32) -> str:
    """A stable id: the same parts (a request id, an upstream id) always give the same id."""
    return prefix + hashlib.sha256("|".join(parts).encode()).hexdigest()[:length]


def sse_event(payload: bytes, event_type: str) -> bytes:
    """One typed SSE event as OpenAI's Responses and Anthropic's Messages streams frame it."""
    return b"event: " + event_type.encode() + b"\ndata: " + payload + b"\n\n"


def event_type(payload: bytes) -> str:
    """The `type` of a typed event's JSON payload (both dialects name the event in it)."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "message"
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else "message"


def bad(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param, extra={"rule": "invalid_body"})


def text_of(parts: Any, where: str, kinds: frozenset[str]) -> str:
    """Text parts (`{"type": one of kinds, "text": ...}`) or a string, joined; anything else is a 400."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise bad(f"'{where}' must be a string or a list of text parts", where)
    texts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
            raise bad(f"'{where}[{i}]' must be a text part", where)
        texts.append(part["text"])
    return "".join(texts)


def as_dict(value: object) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one: upstream garbage reads as absent."""
    return value if isinstance(value, dict) else {}
