"""The built-in `mock` provider: deterministic OpenAI-shaped answers, computed locally.

A keyword in the (upstream) model name, case-insensitive, switches on a fault model:
    "slow"     wait `slow_delay_s` before answering (streams: before the first chunk)
    "error"    raise UpstreamError("mock upstream failure") from `send` and at stream start
    "cut"      streams raise UpstreamError after about half their chunks; `send` raises too
    "nousage"  streams never send the usage chunk, even when `include_usage` asks for it
Keywords combine ("mock-slow-cut"). What the answers say lives in `mock_content`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any, assert_never

import orjson

from gateway.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from gateway.providers.base import Endpoint, Reply
from gateway.providers.mock_content import (
    MAX_DIMENSIONS,
    Choice,
    canonical,
    chat_choices,
    completion_choices,
    embedding_vector,
    int_param,
    prompt_list,
    text_pieces,
)
from gateway.settings import ProviderSettings
from gateway.tokenizer import count_chat_prompt, count_text, encoding_name_for

__all__ = [
    "CUT_MESSAGE",
    "ERROR_MESSAGE",
    "FAULT_CUT",
    "FAULT_ERROR",
    "FAULT_KEYWORDS",
    "FAULT_NO_USAGE",
    "FAULT_SLOW",
    "Faults",
    "MockProvider",
    "answer_text",
    "encoding_for",
]

FAULT_SLOW = "slow"
FAULT_ERROR = "error"
FAULT_CUT = "cut"
FAULT_NO_USAGE = "nousage"
FAULT_KEYWORDS = (FAULT_SLOW, FAULT_ERROR, FAULT_CUT, FAULT_NO_USAGE)
ERROR_MESSAGE = "mock upstream failure"
CUT_MESSAGE = "mock upstream cut the stream"
# Mock model names are unknown to tiktoken; o200k_base keeps their counts real token counts.
FALLBACK_ENCODING = "o200k_base"
DEFAULT_DIMENSIONS = 1536
MAX_EMBEDDING_INPUTS = 2048
# A stream and a plain call of the same request are the same answer, with the same id.
_STREAM_KEYS = frozenset({"stream", "stream_options"})
# `created` falls within the year after this instant, so it looks like a real timestamp.
_EPOCH = 1_700_000_000


@dataclass(frozen=True, slots=True)
class Faults:
    slow: bool
    error: bool
    cut: bool
    no_usage: bool

    @classmethod
    def of(cls, model: str) -> Faults:
        name = model.lower()
        return cls(
            slow=FAULT_SLOW in name,
            error=FAULT_ERROR in name,
            cut=FAULT_CUT in name,
            no_usage=FAULT_NO_USAGE in name,
        )


@dataclass(frozen=True, slots=True)
class _Envelope:
    """What every object of one answer shares."""

    id: str
    created: int
    model: str
    fingerprint: str

    def head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }


def _model(body: dict[str, Any]) -> str:
    return str(body.get("model", ""))


def encoding_for(model: str) -> str:
    return encoding_name_for(model) or FALLBACK_ENCODING


def _envelope(body: dict[str, Any], prefix: str) -> _Envelope:
    digest = hashlib.sha256(canonical(body, without=_STREAM_KEYS)).hexdigest()
    model = _model(body)
    fingerprint = "fp_mock_" + hashlib.sha256(model.encode()).hexdigest()[:8]
    created = _EPOCH + int(digest[24:32], 16) % 31_536_000
    return _Envelope(prefix + digest[:24], created, model, fingerprint)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _wants_usage(body: dict[str, Any], faults: Faults) -> bool:
    options = body.get("stream_options")
    asked = isinstance(options, dict) and options.get("include_usage") is True
    return asked and not faults.no_usage


def _chat_prompt_tokens(body: dict[str, Any], encoding: str) -> int:
    """Messages framed as OpenAI counts them, plus the offered tool definitions, which real
    upstreams also bill as prompt tokens."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    tokens = count_chat_prompt(messages, encoding)
    offered = body.get("tools") or body.get("functions")
    if offered:
        tokens += count_text(orjson.dumps(offered).decode(), encoding)
    return tokens


def _message(choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": choice.text,
        "refusal": None,
        "annotations": [],
    }
    call = choice.tool_call
    if call is not None and call.legacy:
        message["function_call"] = {"name": call.name, "arguments": call.arguments}
    elif call is not None:
        function = {"name": call.name, "arguments": call.arguments}
        message["tool_calls"] = [{"id": call.id, "type": "function", "function": function}]
    return message


def chat_completion(body: dict[str, Any]) -> dict[str, Any]:
    encoding = encoding_for(_model(body))
    prompt_tokens = _chat_prompt_tokens(body, encoding)
    choices = chat_choices(body, encoding)
    return {
        **_envelope(body, "chatcmpl-mock-").head("chat.completion"),
        "choices": [
            {
                "index": c.index,
                "message": _message(c),
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
        "service_tier": "default",
    }


def _chat_deltas(choice: Choice, encoding: str) -> Iterator[tuple[dict[str, Any], str | None]]:
    """OpenAI's delta sequence: a role opener, one piece per chunk, then an empty closing delta."""
    call = choice.tool_call
    if call is None:
        yield {"role": "assistant", "content": "", "refusal": None}, None
        for piece in text_pieces(choice.text or "", encoding):
            yield {"content": piece}, None
    elif call.legacy:
        opening = {"name": call.name, "arguments": ""}
        yield {"role": "assistant", "content": None, "function_call": opening}, None
        for piece in text_pieces(call.arguments, encoding):
            yield {"function_call": {"arguments": piece}}, None
    else:
        function = {"name": call.name, "arguments": ""}
        opener = {"index": 0, "id": call.id, "type": "function", "function": function}
        yield {"role": "assistant", "content": None, "refusal": None, "tool_calls": [opener]}, None
        for piece in text_pieces(call.arguments, encoding):
            yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None
    yield {}, choice.finish_reason


def chat_chunks(body: dict[str, Any], faults: Faults) -> list[dict[str, Any]]:
    encoding = encoding_for(_model(body))
    prompt_tokens = _chat_prompt_tokens(body, encoding)
    choices = chat_choices(body, encoding)
    head = _envelope(body, "chatcmpl-mock-").head("chat.completion.chunk")
    with_usage = _wants_usage(body, faults)
    # Choices stream one after another; OpenAI interleaves them; clients key on `index` either way.
    chunks: list[dict[str, Any]] = []
    for c in choices:
        for delta, finish in _chat_deltas(c, encoding):
            choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            chunks.append({**head, "choices": [choice]})
    return _with_usage_chunk(chunks, head, with_usage, prompt_tokens, choices)


def _with_usage_chunk(
    chunks: list[dict[str, Any]],
    head: dict[str, Any],
    with_usage: bool,
    prompt_tokens: int,
    choices: list[Choice],
) -> list[dict[str, Any]]:
    """`include_usage`: every chunk carries `usage: null`, and a last one with no choices has it."""
    if not with_usage:
        return chunks
    for chunk in chunks:
        chunk["usage"] = None
    usage = _usage(prompt_tokens, sum(c.completion_tokens for c in choices))
    return [*chunks, {**head, "choices": [], "usage": usage}]


def _prompt_tokens(items: list[str | list[int]], encoding: str) -> int:
    return sum(count_text(item, encoding) if isinstance(item, str) else len(item) for item in items)


def completion(body: dict[str, Any]) -> dict[str, Any]:
    encoding = encoding_for(_model(body))
    prompt_tokens = _prompt_tokens(prompt_list(body.get("prompt"), param="prompt"), encoding)
    choices = completion_choices(body, encoding)
    return {
        **_envelope(body, "cmpl-mock-").head("text_completion"),
        "choices": [
            {"text": c.text, "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
            for c in choices
        ],
        "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


def completion_chunks(body: dict[str, Any], faults: Faults) -> list[dict[str, Any]]:
    encoding = encoding_for(_model(body))
    prompt_tokens = _prompt_tokens(prompt_list(body.get("prompt"), param="prompt"), encoding)
    choices = completion_choices(body, encoding)
    head = _envelope(body, "cmpl-mock-").head("text_completion")
    chunks: list[dict[str, Any]] = []
    for c in choices:
        pieces = text_pieces(c.text or "", encoding)
        steps: list[tuple[str, str | None]] = [*((p, None) for p in pieces), ("", c.finish_reason)]
        for text, finish in steps:  # the closing chunk has no text and the finish reason
            choice = {"text": text, "index": c.index, "logprobs": None, "finish_reason": finish}
            chunks.append({**head, "choices": [choice]})
    return _with_usage_chunk(chunks, head, _wants_usage(body, faults), prompt_tokens, choices)


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    model = _model(body)
    items = prompt_list(body.get("input"), param="input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"input may hold at most {MAX_EMBEDDING_INPUTS} items", param="input")
    dims = int_param(body, "dimensions", low=1, high=MAX_DIMENSIONS) or DEFAULT_DIMENSIONS
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    data: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        vector: list[float] | str = embedding_vector(model, item, dims)
        if encoding_format == "base64":  # little-endian float32, what the openai SDK decodes
            vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = _prompt_tokens(items, encoding_for(model))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def answer_text(body: dict[str, Any], *, index: int = 0) -> str:
    """The text of choice `index` for a chat or completions body ("" for a tool call).

    Streamed content pieces join to exactly this, and the plain call's content equals it.
    """
    encoding = encoding_for(_model(body))
    if "messages" in body:
        return chat_choices(body, encoding)[index].text or ""
    return completion_choices(body, encoding)[index].text or ""


def _answer(endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
    match endpoint:
        case Endpoint.CHAT:
            return chat_completion(body)
        case Endpoint.COMPLETIONS:
            return completion(body)
        case Endpoint.EMBEDDINGS:
            return embeddings(body)
        case Endpoint.RESPONSES | Endpoint.MESSAGES:
            raise InvalidRequest(f"the mock speaks chat completions, not /v1/{endpoint}")
        case Endpoint.TOOLS_CALL:
            raise InvalidRequest("the mock is a model, not a tool server")
        case _:
            assert_never(endpoint)


def _chunks(endpoint: Endpoint, body: dict[str, Any], faults: Faults) -> list[dict[str, Any]]:
    match endpoint:
        case Endpoint.CHAT:
            return chat_chunks(body, faults)
        case Endpoint.COMPLETIONS:
            return completion_chunks(body, faults)
        case Endpoint.EMBEDDINGS:
            raise InvalidRequest("embeddings cannot be streamed", param="stream")
        case Endpoint.RESPONSES | Endpoint.MESSAGES:
            raise InvalidRequest(f"the mock speaks chat completions, not /v1/{endpoint}")
        case Endpoint.TOOLS_CALL:
            raise InvalidRequest("the mock is a model, not a tool server")
        case _:
            assert_never(endpoint)


class MockProvider:
    """Answers like an OpenAI upstream without a network; the model name picks fault models."""

    def __init__(self, settings: ProviderSettings, *, slow_delay_s: float = 2.0) -> None:
        self.name = settings.name
        self._timeout_s = settings.timeouts.first_byte_s
        self._slow_delay_s = slow_delay_s
        self.calls = 0  # calls received (send and stream), so tests can see none were made

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        self.calls += 1
        faults = Faults.of(_model(body))
        await self._before_answer(faults)
        if faults.cut:
            raise UpstreamError(CUT_MESSAGE)
        data = _answer(endpoint, body)
        return Reply(body=orjson.dumps(data), data=data)

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        self.calls += 1
        faults = Faults.of(_model(body))
        await self._before_answer(faults)
        # Built whole up front: answers are small, and it keeps cut points and usage exact.
        chunks = _chunks(endpoint, body, faults)
        cut_at = len(chunks) // 2 if faults.cut else -1
        for position, chunk in enumerate(chunks):
            if position == cut_at:
                raise UpstreamError(CUT_MESSAGE)
            yield orjson.dumps(chunk)

    async def _before_answer(self, faults: Faults) -> None:
        if faults.slow:
            # A real upstream slower than the provider's timeout would time out; so does the mock.
            if self._slow_delay_s >= self._timeout_s:
                await asyncio.sleep(self._timeout_s)
                raise UpstreamTimeout("mock upstream timed out")
            await asyncio.sleep(self._slow_delay_s)
        if faults.error:
            raise UpstreamError(ERROR_MESSAGE)

    async def close(self) -> None:
        return None  # nothing to release: no connections, no tasks
