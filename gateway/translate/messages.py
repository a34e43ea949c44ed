"""Anthropic's Messages API in chat-completions form, and back. Pure functions, no I/O.

`to_chat` turns a Messages request into the chat body the PEP checks and a chat upstream
receives; `from_chat` and `ChatToMessages` turn a chat answer or stream into a Message or
its events (`message_start` ... `message_stop`); `MessagesMeter` reads answers that are
already Messages (a `kind: anthropic` provider, a recorded replay). `error_body` is
Anthropic's error shape for any GatewayError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from gateway.errors import GatewayError
from gateway.translate.common import Tokens, as_dict, bad, chat_tokens, message_tokens, text_of

FIELDS: Final = frozenset({
    "model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k",
    "tools", "tool_choice", "stream", "metadata", "service_tier", "thinking",
})  # fmt: skip
STOP_REASONS: Final = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                       "function_call": "tool_use", "content_filter": "refusal"}
_TEXT: Final = frozenset({"text"})
ERROR_TYPES: Final = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                      503: "overloaded_error", 529: "overloaded_error"}


def error_body(exc: GatewayError, request_id: str) -> bytes:
    """Anthropic's error shape; the gateway's own `code` rides along for clients that look."""
    kind = ERROR_TYPES.get(exc.status) or ("invalid_request_error" if exc.status < 500 else "api_error")
    error = {"type": kind, "message": exc.message, "code": exc.code}
    return orjson.dumps({"type": "error", "error": error, "request_id": request_id})


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    for key in body:
        if key not in FIELDS:
            raise bad(f"unrecognized request argument '{str(key)[:64]}' for /v1/messages", str(key))
    chat: dict[str, Any] = {k: body[k] for k in ("model", "temperature", "top_p", "stream", "service_tier") if k in body}
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": text_of(body["system"], "system", _TEXT)})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise bad("'messages' must be a non-empty list", "messages")
    for i, turn in enumerate(turns):
        messages.extend(_turn(turn, f"messages[{i}]"))
    chat["messages"] = messages
    if body.get("max_tokens") is not None:
        chat["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences") is not None:
        chat["stop"] = body["stop_sequences"]
    if "tools" in body:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    return chat


def _turn(turn: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
        raise bad(f"'{where}' must be an object with role 'user' or 'assistant'", where)
    role, content = turn["role"], turn.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad(f"'{where}.content' must be a string or a list of content blocks", where)
    blocks = [(b, f"{where}.content[{j}]") for j, b in enumerate(content)]
    for block, at in blocks:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad(f"'{at}' must be a content block", at)
    return _assistant(blocks) if role == "assistant" else _user(blocks)


def _assistant(blocks: list[tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
    texts, calls = [], []
    for block, at in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(text_of([block], at, _TEXT))
        elif kind == "tool_use":
            name, call_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise bad(f"'{at}' needs a string id and name", at)
            arguments = orjson.dumps(block.get("input", {})).decode()
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind not in ("thinking", "redacted_thinking"):  # a chat upstream can't take thinking back
            raise bad(f"content block type '{kind[:64]}' is not supported in an assistant turn", at)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _user(blocks: list[tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
    # Tool results answer the assistant turn just before, so they come first, as chat wants.
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block, at in blocks:
        kind = block["type"]
        if kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise bad(f"'{at}.tool_use_id' must be a string", at)
            content = block.get("content", "")
            results.append({"role": "tool", "tool_call_id": call_id, "content": text_of(content, f"{at}.content", _TEXT)})
        elif kind == "text":
            parts.append({"type": "text", "text": text_of([block], at, _TEXT)})
        elif kind in ("image", "document"):
            parts.append(_media(block, at))
        else:
            raise bad(f"content block type '{kind[:64]}' is not supported in a user turn", at)
    if parts:
        simple = all(p["type"] == "text" for p in parts)
        results.append({"role": "user", "content": "".join(p["text"] for p in parts) if simple else parts})
    return results


def _media(block: dict[str, Any], at: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str) and block["type"] == "image":
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    if kind == "base64" and isinstance(source, dict) and isinstance(source.get("data"), str):
        data = f"data:{source.get('media_type', '')};base64,{source['data']}"
        if block["type"] == "image":
            return {"type": "image_url", "image_url": {"url": data}}
        return {"type": "file", "file": {"file_data": data}}
    raise bad(f"'{at}.source' must be base64 data (or a URL, for an image)", at)


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad(f"'tools[{i}]' must be an object", "tools")
        kind = tool.get("type", "custom")
        if kind not in ("custom", None):
            out.append({"type": str(kind)})  # a server tool: the PEP decides; only Anthropic runs it
            continue
        function: dict[str, Any] = {"name": tool.get("name")}
        if "description" in tool:
            function["description"] = tool["description"]
        if "input_schema" in tool:
            function["parameters"] = tool["input_schema"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif kind in ("auto", "any", "none"):
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise bad("'tool_choice.type' must be auto, any, tool or none", "tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def usage_object(tokens: Tokens) -> dict[str, Any]:
    # Anthropic counts cache reads apart from `input_tokens`; chat counts them inside.
    return {"input_tokens": tokens.prompt - tokens.cached, "output_tokens": tokens.completion,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": tokens.cached}


def _input(arguments: str) -> Any:
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}  # cut short by max_tokens: Anthropic's `input` is always an object
    return value if isinstance(value, dict) else {}


def from_chat(chat: dict[str, Any], message_id: str) -> dict[str, Any]:
    """The Message for a chat completion (its first choice: Messages has no `n`)."""
    choices = chat.get("choices") or [{}]
    choice = as_dict(choices[0])
    message = as_dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    text = message.get("content") or message.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            content.append({"type": "tool_use", "id": str(call.get("id", "")), "name": str(function.get("name", "")),
                            "input": _input(str(function.get("arguments", "")))})
    return {
        "id": message_id, "type": "message", "role": "assistant", "model": str(chat.get("model", "")),
        "content": content, "stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None, "usage": usage_object(chat_tokens(chat.get("usage")) or Tokens(0, 0)),
    }


class ChatToMessages:
    """Chat stream chunks in, Messages events out (as dicts, in order)."""

    def __init__(self, message_id: str, *, model: str) -> None:
        self._id, self._model = message_id, model
        self._block: int | None = None  # index of the open content block
        self._blocks = 0
        self._text_block: int | None = None
        self._calls: dict[int, int] = {}  # chat tool-call index -> block index
        self._finish_reason: object = None

    def start(self) -> list[dict[str, Any]]:
        message: dict[str, Any] = {"id": self._id, "type": "message", "role": "assistant", "model": self._model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage_object(Tokens(0, 0))}
        return [{"type": "message_start", "message": message}]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if isinstance(content, str) and content:
                if self._text_block is None or self._block != self._text_block:
                    self._text_block = self._open(events, {"type": "text", "text": ""})
                events.append({"type": "content_block_delta", "index": self._text_block,
                               "delta": {"type": "text_delta", "text": content}})
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    self._call_delta(call, events)
        return events

    def _call_delta(self, call: dict[str, Any], events: list[dict[str, Any]]) -> None:
        function = as_dict(call.get("function"))
        index = call.get("index", 0)
        block = self._calls.get(index)
        if block is None:
            opener = {"type": "tool_use", "id": str(call.get("id") or ""), "name": str(function.get("name") or ""), "input": {}}
            block = self._calls[index] = self._open(events, opener)
        fragment = function.get("arguments")
        if isinstance(fragment, str) and fragment and block == self._block:
            events.append({"type": "content_block_delta", "index": block,
                           "delta": {"type": "input_json_delta", "partial_json": fragment}})

    def _open(self, events: list[dict[str, Any]], block: dict[str, Any]) -> int:
        self._close(events)
        self._block, self._blocks = self._blocks, self._blocks + 1
        events.append({"type": "content_block_start", "index": self._block, "content_block": block})
        return self._block

    def _close(self, events: list[dict[str, Any]]) -> None:
        if self._block is not None:
            events.append({"type": "content_block_stop", "index": self._block})
            self._block = None

    def finish(self, tokens: Tokens) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        self._close(events)
        stop = STOP_REASONS.get(str(self._finish_reason), "end_turn")
        events.append({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                       "usage": usage_object(tokens)})
        events.append({"type": "message_stop"})
        return events


def error_event(exc: GatewayError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(exc.status) or ("invalid_request_error" if exc.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message, "code": exc.code}}


def tool_names(message: dict[str, Any]) -> list[str]:
    return [str(block.get("name", "")) for block in message.get("content") or []
            if isinstance(block, dict) and block.get("type") == "tool_use"]


def output_text(message: dict[str, Any]) -> str:
    texts = []
    for block in message.get("content") or []:
        if isinstance(block, dict) and block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") == "tool_use":
            texts.append(str(block.get("name", "")) + orjson.dumps(block.get("input", {})).decode())
    return "".join(texts)


@dataclass(slots=True)
class MessagesMeter:
    """Follows a stream of Messages events: tool calls, text and usage; `done` at message_stop."""

    text: list[str] = field(default_factory=list)
    prompt: int | None = None
    cached: int = 0
    completion: int | None = None
    done: bool = False

    def observe(self, event: dict[str, Any]) -> list[str]:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            # Only the input count: output is final (cumulative) in message_delta alone, so a
            # stream cut before it is counted from its text, as a cut chat stream is.
            self._usage({k: v for k, v in as_dict(event["message"].get("usage")).items() if k != "output_tokens"})
        elif kind == "message_delta":
            self._usage(event.get("usage"))
        elif kind == "content_block_start":
            block = event.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                self.text.append(str(block.get("name", "")))
                return [str(block.get("name", ""))]
        elif kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            delta = event["delta"]
            self.text.append(str(delta.get("text") or delta.get("partial_json") or ""))
        elif kind == "message_stop":
            self.done = True
        return []

    def _usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        if isinstance(usage.get("input_tokens"), int):
            tokens = message_tokens(usage)
            assert tokens is not None
            self.prompt, self.cached = tokens.prompt, tokens.cached
        if isinstance(usage.get("output_tokens"), int):
            self.completion = usage["output_tokens"]  # cumulative, as Anthropic reports it

    @property
    def tokens(self) -> Tokens | None:
        if self.prompt is None or self.completion is None:
            return None
        return Tokens(self.prompt, self.completion, self.cached)
