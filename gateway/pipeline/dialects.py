"""The two dialects besides chat completions, as the Exchange sees them: how to address a
native upstream (the client's body, with what the PEP decided applied to it), how to read
an answer already in the dialect (usage, tool calls, when a stream is complete), and how
to turn a chat answer or stream into the dialect.

A provider speaks a dialect natively when it lists the endpoint in `native_endpoints`
(OpenAI with `responses: native`, `kind: anthropic`, and a recorded replay, which answers
with what the client got the first time); every other upstream gets the chat form.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from gateway.assembly.model import ModelGrant
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.pipeline.policy import Grant
from gateway.pipeline.request_fields import normalise_name
from gateway.pipeline.usage import Usage
from gateway.providers.base import Endpoint, Provider
from gateway.tokenizer import count_text
from gateway.translate import messages, responses
from gateway.translate.common import Tokens, derived_id, message_tokens, response_tokens


def speaks(provider: Provider, endpoint: Endpoint) -> bool:
    return endpoint in getattr(provider, "native_endpoints", ())


def passes_through(provider: Provider, endpoint: Endpoint, *, plugins: bool) -> bool:
    """Whether this call goes to the upstream in its own dialect rather than as chat.

    Policy plugins read and rewrite the chat form (request, chunks, answer); a body passed
    through would skip them, so with plugins on, a native upstream is asked in chat form,
    and one that speaks only its dialect (`kind: anthropic`) refuses. A recorded replay
    always answers as recorded: its plugins ran the first time.
    """
    if not speaks(provider, endpoint):
        return False
    if not plugins or provider.name == "replay":
        return True
    if getattr(provider, "speaks_chat", True):
        return False
    raise InvalidRequest(
        f"policy plugins are on and provider '{provider.name}' passes /v1/{endpoint} through only; "
        "serve this model through a provider that speaks chat completions (kind: litellm)",
        code="plugins_need_chat_form",
    )


class StreamTranslator(Protocol):
    def start(self) -> list[dict[str, Any]]: ...
    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]: ...
    def finish(self, tokens: Tokens) -> list[dict[str, Any]]: ...


class NativeMeter(Protocol):
    text: list[str]

    def observe(self, event: dict[str, Any]) -> list[str]: ...

    @property
    def complete(self) -> bool: ...

    @property
    def usage(self) -> Tokens | None: ...


class Dialect(Protocol):
    @property
    def endpoint(self) -> Endpoint: ...

    def native_body(self, body: dict[str, Any], grant: Grant, history: list[dict[str, Any]]) -> dict[str, Any]: ...
    def from_chat(self, chat: dict[str, Any], body: dict[str, Any], seed: str) -> dict[str, Any]: ...
    def translator(self, body: dict[str, Any], seed: str, model: str) -> StreamTranslator: ...
    def meter(self) -> NativeMeter: ...
    def tokens(self, answer: dict[str, Any]) -> Tokens | None: ...
    def tool_names(self, answer: dict[str, Any]) -> list[str]: ...
    def output_text(self, answer: dict[str, Any]) -> str: ...
    def error_event(self, exc: GatewayError, sent: int) -> dict[str, Any]: ...


def _frozen_functions(grant: Grant) -> dict[str, dict[str, Any]]:
    """The Assembly's definitions of the functions the PEP let through, by normalised name."""
    return {normalise_name(t["function"]["name"]): t["function"] for t in grant.body.get("tools") or []
            if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)}


def _pinned(params: dict[str, Any], names: dict[str, str], dialect: str) -> dict[str, Any]:
    """The plan's pinned parameters under the dialect's names; one it has no name for is refused
    rather than dropped, so a native upstream never runs outside what was pinned."""
    out = {}
    for key, value in params.items():
        if key not in names:
            raise InvalidRequest(f"parameter '{key}' is pinned by this session's plan and a {dialect} upstream "
                                 "cannot be sent it", param=key, extra={"rule": "pinned_param"})
        out[names[key]] = value
    return out


def pinned_params(endpoint: Endpoint, params: dict[str, Any]) -> dict[str, Any]:
    """A model's pinned parameters as a call to `endpoint` names them: a dialect's under its own
    names (see `_pinned`), every other endpoint's as they are. For a fallback's body."""
    if endpoint is Endpoint.RESPONSES:
        return _pinned(params, _Responses._PARAMS, "Responses")
    if endpoint is Endpoint.MESSAGES:
        return _pinned(params, _Messages._PARAMS, "Messages")
    return params


class _Responses:
    endpoint: Final = Endpoint.RESPONSES
    _PARAMS: Final = {k: k for k in ("temperature", "top_p", "parallel_tool_calls", "user", "service_tier",
                                     "top_logprobs", "safety_identifier", "prompt_cache_key")}

    def native_body(self, body: dict[str, Any], grant: Grant, history: list[dict[str, Any]]) -> dict[str, Any]:
        out = {k: v for k, v in body.items() if k != "previous_response_id"}
        if history:  # the upstream never saw our ids: it gets the conversation itself
            out["input"] = [*history, *responses.input_items(body.get("input"))]
        out.update(_pinned(grant.model.params, self._PARAMS, "Responses"))
        out["model"] = grant.body["model"]
        out["max_output_tokens"] = grant.max_output_tokens
        frozen = _frozen_functions(grant)
        if isinstance(body.get("tools"), list):
            out["tools"] = [self._frozen_tool(t, frozen) for t in body["tools"]]
        return out

    @staticmethod
    def _frozen_tool(tool: Any, frozen: dict[str, dict[str, Any]]) -> Any:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            return tool
        function = frozen[normalise_name(str(tool.get("name")))]
        return {**tool, "description": function.get("description"), "parameters": function.get("parameters")}

    def _ids(self, seed: str) -> responses.Ids:
        return responses.Ids(derived_id("resp_", seed))

    def from_chat(self, chat: dict[str, Any], body: dict[str, Any], seed: str) -> dict[str, Any]:
        return responses.from_chat(chat, body, self._ids(seed), created_at=int(time.time()))

    def translator(self, body: dict[str, Any], seed: str, model: str) -> StreamTranslator:
        return responses.ChatToResponses(body, self._ids(seed), created_at=int(time.time()), model=model)

    def meter(self) -> NativeMeter:
        return _ResponsesMeter()

    def tokens(self, answer: dict[str, Any]) -> Tokens | None:
        return response_tokens(answer.get("usage"))

    def tool_names(self, answer: dict[str, Any]) -> list[str]:
        return responses.tool_names(answer)

    def output_text(self, answer: dict[str, Any]) -> str:
        return responses.output_text(answer)

    def error_event(self, exc: GatewayError, sent: int) -> dict[str, Any]:
        # Numbered after every event sent, as the translator and OpenAI both number them.
        return {"type": "error", "code": exc.code, "message": exc.message, "param": None, "sequence_number": sent}


class _ResponsesMeter(responses.ResponsesMeter):
    def observe(self, event: dict[str, Any]) -> list[str]:
        if event.get("type") in ("error", "response.failed"):
            raise UpstreamError("upstream failed mid-stream")
        return super().observe(event)

    @property
    def complete(self) -> bool:
        return self.final is not None

    @property
    def usage(self) -> Tokens | None:
        return self.tokens


class _Messages:
    endpoint: Final = Endpoint.MESSAGES
    _PARAMS: Final = {"temperature": "temperature", "top_p": "top_p", "stop": "stop_sequences"}

    def native_body(self, body: dict[str, Any], grant: Grant, history: list[dict[str, Any]]) -> dict[str, Any]:
        out = {**body, **_pinned(grant.model.params, self._PARAMS, "Messages")}
        out["model"] = grant.body["model"]
        out["max_tokens"] = grant.max_output_tokens
        frozen = _frozen_functions(grant)
        if isinstance(body.get("tools"), list):
            out["tools"] = [self._frozen_tool(t, frozen) for t in body["tools"]]
        return out

    @staticmethod
    def _frozen_tool(tool: Any, frozen: dict[str, dict[str, Any]]) -> Any:
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            return tool
        function = frozen[normalise_name(str(tool.get("name")))]
        return {**tool, "description": function.get("description"), "input_schema": function.get("parameters")}

    def from_chat(self, chat: dict[str, Any], body: dict[str, Any], seed: str) -> dict[str, Any]:
        return messages.from_chat(chat, derived_id("msg_", seed, length=24))

    def translator(self, body: dict[str, Any], seed: str, model: str) -> StreamTranslator:
        return messages.ChatToMessages(derived_id("msg_", seed, length=24), model=model)

    def meter(self) -> NativeMeter:
        return _MessagesMeter()

    def tokens(self, answer: dict[str, Any]) -> Tokens | None:
        return message_tokens(answer.get("usage"))

    def tool_names(self, answer: dict[str, Any]) -> list[str]:
        return messages.tool_names(answer)

    def output_text(self, answer: dict[str, Any]) -> str:
        return messages.output_text(answer)

    def error_event(self, exc: GatewayError, sent: int) -> dict[str, Any]:
        return messages.error_event(exc)


class _MessagesMeter(messages.MessagesMeter):
    def observe(self, event: dict[str, Any]) -> list[str]:
        if event.get("type") == "error":
            raise UpstreamError("upstream failed mid-stream")
        return super().observe(event)

    @property
    def complete(self) -> bool:
        return self.done

    @property
    def usage(self) -> Tokens | None:
        return self.tokens


RESPONSES: Final[Dialect] = _Responses()
MESSAGES: Final[Dialect] = _Messages()


@dataclass(slots=True)
class NativeUsage:
    """A native stream's meter as the Exchange reads any meter: chunks seen, usage so far.
    Without the upstream's final counts, the prompt is the estimate and the output is
    counted from the text, as for a chat stream that carried no usage."""

    meter: NativeMeter
    prompt_estimate: int
    model: ModelGrant
    chunks: int = 0

    def final_usage(self) -> Usage:
        tokens = self.meter.usage
        if tokens is not None:
            return Usage(tokens.prompt, tokens.completion)
        return Usage(self.prompt_estimate, count_text("".join(self.meter.text), self.model.encoding))


@dataclass(frozen=True, slots=True)
class Wire:
    """A call sent to its upstream in its own dialect: the endpoint, the body, how to read it."""

    dialect: Dialect
    body: dict[str, Any]

    def usage(self, answer: dict[str, Any], prompt_estimate: int, model: ModelGrant) -> Usage:
        tokens = self.dialect.tokens(answer)
        if tokens is not None:
            return Usage(tokens.prompt, tokens.completion)
        return Usage(prompt_estimate, count_text(self.dialect.output_text(answer), model.encoding))


@dataclass(slots=True)
class Turn:
    """One dialect call as its route drives it: the dialect, the conversation before it
    (Responses' previous_response_id), and the journal fields its answer carries."""

    dialect: Dialect
    body: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def wire(self, provider: Provider, grant: Grant, *, plugins: bool) -> Wire | None:
        """How to send it: natively (a Wire), or None for the chat form."""
        if not passes_through(provider, self.dialect.endpoint, plugins=plugins):
            return None
        return Wire(self.dialect, self.dialect.native_body(self.body, grant, self.history))

    def seed(self, request_id: str, upstream_id: object) -> str:
        return f"{request_id}|{upstream_id or ''}"
