"""The OpenAI Responses API in chat-completions form, and back. Pure functions, no I/O.

`to_chat` turns a request (plus the items of the conversation `previous_response_id`
names) into the chat body the PEP checks and a chat-only upstream receives. `from_chat`
and `ChatToResponses` turn a chat answer or stream into a Response object or its typed
events. `ResponsesMeter` reads answers that are already Responses (a native upstream, a
recorded replay): the tool calls and usage they carry. What a translation loses is listed
in the README ("Responses and Messages").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from gateway.translate.common import Tokens, as_dict, bad, chat_tokens, response_tokens, text_of

FIELDS: Final = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "temperature", "top_p", "stream", "store", "previous_response_id",
    "metadata", "user", "text", "reasoning", "truncation", "include", "service_tier",
    "top_logprobs", "safety_identifier", "prompt_cache_key", "background", "stream_options",
})  # fmt: skip
# Copied to the chat body as they are: the same name and meaning in both APIs.
_SAME: Final = ("model", "temperature", "top_p", "parallel_tool_calls", "user", "service_tier",
                "safety_identifier", "prompt_cache_key", "stream")
_TEXT_PARTS: Final = frozenset({"input_text", "output_text", "text"})
_ROLES: Final = frozenset({"user", "assistant", "system", "developer"})
TERMINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})


def to_chat(body: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat body equivalent to `body`; `history`: input and output items of earlier turns."""
    for key in body:
        if key not in FIELDS:
            raise bad(f"unrecognized request argument '{str(key)[:64]}' for /v1/responses", str(key))
    if body.get("background"):
        raise bad("background responses are not supported by this gateway", "background")
    if body.get("truncation") not in (None, "disabled"):
        raise bad("only truncation 'disabled' is supported", "truncation")
    chat: dict[str, Any] = {k: body[k] for k in _SAME if k in body}
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages.extend(items_to_messages([*history, *input_items(body.get("input"))]))
    if not messages:
        raise bad("'input' must not be empty", "input")
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if "tools" in body:
        chat["tools"] = _tools(body["tools"])
    if "tool_choice" in body:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("top_logprobs") is not None:
        chat["logprobs"], chat["top_logprobs"] = True, body["top_logprobs"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    _text_options(body.get("text"), chat)
    if "stream_options" in body:
        chat["stream_options"] = body["stream_options"]
    return chat


def input_items(value: Any) -> list[dict[str, Any]]:
    """`input` as a list of items: a string is one user message."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise bad("'input' must be a string or a list of items", "input")
    return value


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = {"id": _str(item, "call_id", where), "type": "function",
                    "function": {"name": _str(item, "name", where), "arguments": _str(item, "arguments", where)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else text_of(output, f"{where}.output", _TEXT_PARTS)
            messages.append({"role": "tool", "tool_call_id": _str(item, "call_id", where), "content": content})
        elif kind == "reasoning":
            continue  # a chat upstream has no way to take reasoning back in
        else:
            raise bad(f"input item type '{str(kind)[:64]}' is not supported by this gateway", where)
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise bad(f"'{where}.role' must be one of user, assistant, system, developer", where)
    content = item.get("content")
    if role == "user" and isinstance(content, list):
        return {"role": "user", "content": [_user_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]}
    if isinstance(content, list):
        # An earlier answer's parts: a refusal is carried back as the text it was.
        content = [{"type": "text", "text": p["refusal"]} if isinstance(p, dict) and p.get("type") == "refusal"
                   and isinstance(p.get("refusal"), str) else p for p in content]
    return {"role": role, "content": text_of(content, f"{where}.content", _TEXT_PARTS)}


def _user_part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        image = {"url": part["image_url"]}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and isinstance(part.get("file_data"), str):
        file = {"file_data": part["file_data"], **({"filename": part["filename"]} if "filename" in part else {})}
        return {"type": "file", "file": file}
    raise bad(f"'{where}' is not a supported content part (input_text, input_image by URL, input_file by data)", where)


def _str(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad(f"'{where}.{key}' must be a string", where)
    return value


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise bad(f"'tools[{i}]' must be an object with a type", "tools")
        if tool["type"] != "function":
            out.append({"type": tool["type"]})  # built-in: the PEP decides; only a native upstream runs it
            continue
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _text_options(text: Any, chat: dict[str, Any]) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise bad("'text' must be an object", "text")
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]


@dataclass(frozen=True, slots=True)
class Ids:
    """The ids of one response and its items, derived from one stable seed."""

    response: str

    @property
    def message(self) -> str:
        return "msg_" + self.response.removeprefix("resp_")

    def call(self, index: int) -> str:
        return f"fc_{self.response.removeprefix('resp_')}_{index}"


def shell(request: dict[str, Any], ids: Ids, created_at: int, model: str, status: str) -> dict[str, Any]:
    """A Response object without output or usage, echoing the request's settings."""
    text = request.get("text") if isinstance(request.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": ids.response, "object": "response", "created_at": created_at, "status": status,
        "background": False, "error": None, "incomplete_details": None,
        "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
        "model": model, "output": [], "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
        "store": request.get("store", True), "temperature": request.get("temperature", 1.0),
        "text": text, "tool_choice": request.get("tool_choice", "auto"), "tools": request.get("tools", []),
        "top_p": request.get("top_p", 1.0), "truncation": "disabled", "usage": None,
        "user": request.get("user"), "metadata": request.get("metadata") or {},
    }


def usage_object(tokens: Tokens) -> dict[str, Any]:
    return {
        "input_tokens": tokens.prompt, "input_tokens_details": {"cached_tokens": tokens.cached},
        "output_tokens": tokens.completion, "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
        "total_tokens": tokens.prompt + tokens.completion,
    }


def message_item(ids: Ids, text: str, refusal: str | None, status: str = "completed") -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": ids.message, "type": "message", "status": status, "role": "assistant", "content": content}


def call_item(ids: Ids, index: int, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": ids.call(index), "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def _finish(response: dict[str, Any], finish_reason: object) -> None:
    if finish_reason == "length":
        response["status"], response["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
    elif finish_reason == "content_filter":
        response["status"], response["incomplete_details"] = "incomplete", {"reason": "content_filter"}
    else:
        response["status"] = "completed"


def from_chat(chat: dict[str, Any], request: dict[str, Any], ids: Ids, *, created_at: int) -> dict[str, Any]:
    """The Response object for a chat completion (its first choice: Responses has no `n`)."""
    choices = chat.get("choices") or [{}]
    choice = as_dict(choices[0])
    message = as_dict(choice.get("message"))
    created = chat.get("created")
    response = shell(request, ids, created if isinstance(created, int) else created_at, str(chat.get("model", "")), "completed")
    output: list[dict[str, Any]] = []
    content, refusal = message.get("content"), message.get("refusal")
    if isinstance(content, str) and content or isinstance(refusal, str) and refusal:
        output.append(message_item(ids, content if isinstance(content, str) else "", refusal if isinstance(refusal, str) else None))
    for i, call in enumerate(_calls(message)):
        output.append(call_item(ids, i, *call))
    response["output"] = output
    _finish(response, choice.get("finish_reason"))
    tokens = chat_tokens(chat.get("usage"))
    response["usage"] = usage_object(tokens or Tokens(0, 0))
    return response


def _calls(message: dict[str, Any]) -> list[tuple[str, str, str]]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            calls.append((str(call.get("id", "")), str(function.get("name", "")), str(function.get("arguments", ""))))
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        calls.append(("call_legacy", str(legacy.get("name", "")), str(legacy.get("arguments", ""))))
    return calls


@dataclass(slots=True)
class _Call:
    output_index: int
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)


class ChatToResponses:
    """Chat stream chunks in, Responses' typed events out (as dicts, in order).

    `start()` opens the response, `feed()` takes each chunk, `finish()` closes every open
    item and sends `response.completed` (or `.incomplete`) with the usage it is given.
    """

    def __init__(self, request: dict[str, Any], ids: Ids, *, created_at: int, model: str) -> None:
        self._request, self._ids, self._created_at, self._model = request, ids, created_at, model
        self._seq = 0
        self._next_index = 0
        self._text: list[str] = []
        self._text_index: int | None = None
        self._calls: dict[int, _Call] = {}
        self._finish_reason: object = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self._seq}
        self._seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        snapshot = shell(self._request, self._ids, self._created_at, self._model, "in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if isinstance(chunk.get("created"), int):
            self._created_at = chunk["created"]
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
                events.extend(self._text_delta(content))
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    events.extend(self._call_delta(call))
        return events

    def _text_delta(self, piece: str) -> list[dict[str, Any]]:
        events = []
        if self._text_index is None:
            self._text_index = self._claim_index()
            item = message_item(self._ids, "", None, "in_progress")
            events.append(self._event("response.output_item.added", output_index=self._text_index, item=item))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._event("response.content_part.added", item_id=self._ids.message,
                                      output_index=self._text_index, content_index=0, part=part))
        self._text.append(piece)
        events.append(self._event("response.output_text.delta", item_id=self._ids.message, output_index=self._text_index,
                                  content_index=0, delta=piece, logprobs=[]))
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        index = call.get("index", 0)
        function = as_dict(call.get("function"))
        known = self._calls.get(index)
        if known is None:
            known = self._calls[index] = _Call(self._claim_index(), str(call.get("id") or ""), str(function.get("name") or ""))
            item = call_item(self._ids, len(self._calls) - 1, known.call_id, known.name, "", "in_progress")
            events.append(self._event("response.output_item.added", output_index=known.output_index, item=item))
        fragment = function.get("arguments")
        if isinstance(fragment, str) and fragment:
            known.arguments.append(fragment)
            events.append(self._event("response.function_call_arguments.delta", item_id=self._call_id(index),
                                      output_index=known.output_index, delta=fragment))
        return events

    def _call_id(self, chat_index: int) -> str:
        return self._ids.call(list(self._calls).index(chat_index))

    def _claim_index(self) -> int:
        self._next_index += 1
        return self._next_index - 1

    def finish(self, tokens: Tokens) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        items: list[tuple[int, dict[str, Any]]] = []
        if self._text_index is not None:
            text = "".join(self._text)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            events.append(self._event("response.output_text.done", item_id=self._ids.message,
                                      output_index=self._text_index, content_index=0, text=text, logprobs=[]))
            events.append(self._event("response.content_part.done", item_id=self._ids.message,
                                      output_index=self._text_index, content_index=0, part=part))
            item = message_item(self._ids, text, None)
            events.append(self._event("response.output_item.done", output_index=self._text_index, item=item))
            items.append((self._text_index, item))
        for position, call in enumerate(self._calls.values()):
            arguments = "".join(call.arguments)
            item = call_item(self._ids, position, call.call_id, call.name, arguments)
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=call.output_index, name=call.name, arguments=arguments))
            events.append(self._event("response.output_item.done", output_index=call.output_index, item=item))
            items.append((call.output_index, item))
        response = shell(self._request, self._ids, self._created_at, self._model, "completed")
        response["output"] = [item for _, item in sorted(items, key=lambda pair: pair[0])]
        _finish(response, self._finish_reason)
        response["usage"] = usage_object(tokens)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        events.append(self._event(kind, response=response))
        return events

    def error(self, code: str, message: str) -> dict[str, Any]:
        """The event that ends a stream the gateway could not finish."""
        return self._event("error", code=code, message=message, param=None)


def tool_names(response: dict[str, Any]) -> list[str]:
    return [str(item.get("name", "")) for item in response.get("output") or []
            if isinstance(item, dict) and item.get("type") == "function_call"]


def output_text(response: dict[str, Any]) -> str:
    """Everything generated, for counting when an upstream gave no usage."""
    texts = []
    for item in response.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            texts.append(str(item.get("name", "")) + str(item.get("arguments", "")))
        for part in item.get("content") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return "".join(texts)


@dataclass(slots=True)
class ResponsesMeter:
    """Follows a stream of Responses events: tool calls, text, the final response and its usage."""

    text: list[str] = field(default_factory=list)
    tokens: Tokens | None = None
    final: dict[str, Any] | None = None

    def observe(self, event: dict[str, Any]) -> list[str]:
        """Record one event; returns the names of the tool calls it opens."""
        kind = event.get("type")
        if kind == "response.output_text.delta" or kind == "response.function_call_arguments.delta":
            self.text.append(str(event.get("delta", "")))
        elif kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                self.text.append(str(item.get("name", "")))
                return [str(item.get("name", ""))]
        elif kind in TERMINAL and isinstance(event.get("response"), dict):
            self.final = event["response"]
            self.tokens = response_tokens(self.final.get("usage"))
        return []


def parse_event(payload: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
