"""Token estimates before a call, actual usage after it, and what it costs.

The estimate is the worst case the budget reserves: every prompt token plus `n` ×
the effective `max_tokens`, at the Assembly's frozen prices (a model's dearest, when
its deployments have their own). Actual usage comes from the provider; when it is
missing (a stream without a usage chunk, a cut stream) we count the text that was
generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.assembly.model import FrozenPrice, ModelGrant
from gateway.money import cost_nanos
from gateway.providers.base import Endpoint
from gateway.tokenizer import count_chat_prompt, count_text


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def charge(frozen: FrozenPrice, usage: Usage) -> int:
    return cost_nanos(usage.prompt_tokens, frozen.input_nanos_per_mtok) + cost_nanos(
        usage.completion_tokens, frozen.output_nanos_per_mtok
    )


def price(model: ModelGrant, usage: Usage) -> int:
    return charge(model.price, usage)


def dearest(model: ModelGrant, usage: Usage) -> int:
    """What `usage` costs at the dearest price the model may be charged (a deployment's own included)."""
    if not model.deployments:
        return charge(model.price, usage)
    return max(charge(frozen, usage) for frozen in model.prices)


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return "".join(value)
        # Token-id arrays: one token per id; anything else, its JSON bytes bound it.
        if all(isinstance(v, int) for v in value):
            return "x " * len(value)
    return orjson.dumps(value).decode()


def prompt_tokens(model: ModelGrant, endpoint: Endpoint, body: dict[str, Any]) -> int:
    """Prompt tokens the upstream will count, or an upper bound of them."""
    if endpoint is Endpoint.CHAT:
        messages = body.get("messages")
        tokens = count_chat_prompt(messages if isinstance(messages, list) else [], model.encoding)
        for key in ("tools", "functions", "response_format"):
            if key in body:
                # Definitions are rendered into the prompt in a private format; their
                # JSON byte length bounds their token count.
                tokens += len(orjson.dumps(body[key]))
        return tokens
    source = body.get("prompt" if endpoint is Endpoint.COMPLETIONS else "input", "")
    if isinstance(source, list) and source and all(isinstance(v, int) for v in source):
        return len(source)
    return count_text(_prompt_text(source), model.encoding) + 8


@dataclass(frozen=True, slots=True)
class Estimate:
    prompt_tokens: int
    max_output_tokens: int  # n × max_tokens
    nanos: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_output_tokens


def estimate(model: ModelGrant, endpoint: Endpoint, body: dict[str, Any], *, n: int, max_tokens: int) -> Estimate:
    prompt = prompt_tokens(model, endpoint, body)
    output = 0 if endpoint is Endpoint.EMBEDDINGS else n * max_tokens
    return Estimate(prompt, output, dearest(model, Usage(prompt, output)))


def reply_usage(data: dict[str, Any], fallback_prompt: int, model: ModelGrant) -> Usage:
    """Usage from a non-streamed answer; counted from its text when the provider gave none.
    An answer of the wrong shape counts what it holds; it never raises."""
    usage = data.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        completion = usage.get("completion_tokens")
        return Usage(usage["prompt_tokens"], completion if isinstance(completion, int) else 0)
    text: list[str] = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            message = choice.get("message")
            message = message if isinstance(message, dict) else {}
            text.append(str(message.get("content") or choice.get("text") or ""))
            _tool_call_text(message.get("tool_calls"), text)
    return Usage(fallback_prompt, count_text("".join(text), model.encoding))


def _tool_call_text(calls: Any, out: list[str]) -> None:
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))


def tool_call_names(message_or_delta: dict[str, Any]) -> list[str]:
    """Tool names in a response message or a streamed delta (`tool_calls[].function.name`
    and legacy `function_call.name`). In streams only a call's first fragment has the name."""
    if not isinstance(message_or_delta, dict):
        return []  # a provider's garbage is the provider's error, found elsewhere
    names: list[str] = []
    calls = message_or_delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if isinstance(name, str) and name:
                names.append(name)
    legacy = message_or_delta.get("function_call")
    name = legacy.get("name") if isinstance(legacy, dict) else None
    if isinstance(name, str) and name:
        names.append(name)
    return names


@dataclass(slots=True)
class StreamMeter:
    """Follows a stream chunk by chunk: generated text, usage, tool-call names."""

    model: ModelGrant
    prompt_estimate: int
    chunks: int = 0
    usage: Usage | None = None
    called: tuple[str, ...] = ()  # tool names called in the last chunk observed
    _text: list[str] = field(default_factory=list)

    def observe(self, chunk: dict[str, Any]) -> bool:
        """Record one parsed chunk; True when it is the usage-only chunk (no choices). The
        tool names its deltas call are left in `called`, for the output PEP."""
        self.chunks += 1
        self.called = ()
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            completion = usage.get("completion_tokens")
            self.usage = Usage(usage["prompt_tokens"], completion if isinstance(completion, int) else 0)
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return usage is not None
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            content = delta.get("content")
            if isinstance(content, str):
                self._text.append(content)
            elif isinstance(choice.get("text"), str):
                self._text.append(choice["text"])
            if "tool_calls" in delta or "function_call" in delta:  # most chunks carry text only
                _tool_call_text(delta.get("tool_calls"), self._text)
                self.called = (*self.called, *tool_call_names(delta))
        return False

    @property
    def text(self) -> str:
        return "".join(self._text)

    def final_usage(self) -> Usage:
        if self.usage is not None:
            return self.usage
        return Usage(self.prompt_estimate, count_text(self.text, self.model.encoding))
