"""`output_limits`: bounds on what an answer may carry, streamed or not: characters per
choice, tool calls per response and per session, and tool-call arguments that must be
valid JSON matching the tool's schema as frozen in the Assembly.

The per-session count is kept in Redis by the gateway (`session_counters`): read before
the call, added to once its answer settles. Concurrent calls of one session can together
overshoot it by what they make at once; the session's budget is the hard limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import orjson
from pydantic import Field

from gateway.assembly.model import Assembly
from gateway.plugins import PluginDenied, PluginOptions, Scratch

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

Positive = Annotated[int, Field(ge=1, le=10**9)]


class OutputLimitsOptions(PluginOptions):
    max_chars: Positive | None = None  # per choice
    max_tool_calls: Positive | None = None  # per response, all choices together
    max_tool_calls_per_session: Positive | None = None
    validate_tool_arguments: bool = True  # against the Assembly's frozen schema


class OutputLimits:
    name: ClassVar[str] = "output_limits"
    version: ClassVar[str] = "1.0.0"
    Options: ClassVar[type[PluginOptions]] = OutputLimitsOptions

    def __init__(self, options: OutputLimitsOptions, assembly: Assembly) -> None:
        self.max_chars = options.max_chars
        self.max_tool_calls = options.max_tool_calls
        self.per_session = options.max_tool_calls_per_session
        self.session_counters: tuple[str, ...] = ("tool_calls",) if self.per_session else ()
        # Built once per Assembly and step: the schemas never change. Imported here, not at
        # start-up: jsonschema takes longer to import than the rest of the gateway's start.
        from jsonschema import Draft202012Validator

        self.validators = {
            name: Draft202012Validator(tool.parameters) for name, tool in assembly.tools.items()
        } if options.validate_tool_arguments else None

    def on_request(self, body: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        if self.per_session and scratch.session.get("tool_calls", 0) >= self.per_session and _offers_tools(body):
            message = f"this session has made its {self.per_session} tool calls; call without tools"
            raise PluginDenied(message, param="tools", extra={"rule": "tool_calls_per_session"})
        return None

    def on_chunk(self, chunk: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        chars: dict[int, int] = scratch.data.setdefault("chars", {})
        calls: dict[tuple[int, int], list[str]] = scratch.data.setdefault("calls", {})
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = _int(choice.get("index"))
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            if isinstance(text, str):
                chars[index] = chars.get(index, 0) + len(text)
                self._check_chars(chars[index])
            for fragment in delta.get("tool_calls") or []:
                if isinstance(fragment, dict):
                    _gather(calls, index, fragment)
            self._check_count(len(calls), scratch)
            if choice.get("finish_reason") is not None:
                self._check_calls([c for (i, _), c in sorted(calls.items()) if i == index])
                scratch.data.setdefault("checked", set()).add(index)
        return None

    def on_stream_end(self, last: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        checked: set[int] = scratch.data.get("checked", set())
        calls: dict[tuple[int, int], list[str]] = scratch.data.get("calls", {})
        self._check_calls([c for (i, _), c in sorted(calls.items()) if i not in checked])
        return None

    def on_response(self, data: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        found = []
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            message = message if isinstance(message, dict) else {}
            text = message.get("content") if "message" in choice else choice.get("text")
            if isinstance(text, str):
                self._check_chars(len(text))
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    found.append([str(function.get("name") or ""), str(function.get("arguments") or "")])
        self._check_count(len(found), scratch)
        self._check_calls(found)
        return None

    def _check_chars(self, chars: int) -> None:
        if self.max_chars is not None and chars > self.max_chars:
            raise PluginDenied(f"answer longer than {self.max_chars} characters", extra={"rule": "output_too_long"})

    def _check_count(self, count: int, scratch: Scratch) -> None:
        if self.max_tool_calls is not None and count > self.max_tool_calls:
            message = f"the answer makes more than {self.max_tool_calls} tool calls"
            raise PluginDenied(message, extra={"rule": "too_many_tool_calls"})
        if self.per_session:
            if scratch.session.get("tool_calls", 0) + count > self.per_session:
                message = f"the answer would take this session past {self.per_session} tool calls"
                raise PluginDenied(message, extra={"rule": "tool_calls_per_session"})
            scratch.session_add["tool_calls"] = count

    def _check_calls(self, calls: list[list[str]]) -> None:
        if self.validators is None:
            return
        for name, arguments in calls:
            validator = self.validators.get(name.strip().lower())
            if validator is None:
                continue  # a tool outside the VCS is the PEP's denial, checked before this
            try:
                value = orjson.loads(arguments or "{}")
            except orjson.JSONDecodeError:
                value = _NOT_JSON
            error = "arguments are not JSON" if value is _NOT_JSON else _first_error(validator, value)
            if error is not None:
                raise PluginDenied(
                    f"the answer calls tool '{name[:64]}' with arguments its frozen schema refuses: {error}",
                    extra={"rule": "tool_arguments_invalid"},
                )


_NOT_JSON = object()


def _offers_tools(body: dict[str, Any]) -> bool:
    return bool(body.get("tools") or body.get("functions"))


def _first_error(validator: Draft202012Validator, value: Any) -> str | None:
    try:
        for error in validator.iter_errors(value):
            where = "/".join(str(p) for p in error.absolute_path) or "(arguments)"
            return f"{where}: {error.message[:200]}"
    except Exception as exc:  # a frozen schema jsonschema can't apply (a bad regex, say): refuse
        return f"the schema cannot be applied ({type(exc).__name__})"
    return None


def _gather(calls: dict[tuple[int, int], list[str]], choice: int, fragment: dict[str, Any]) -> None:
    """Streamed tool calls arrive in fragments: the name with the first, arguments in pieces."""
    call = calls.setdefault((choice, _int(fragment.get("index"))), ["", ""])
    function = fragment.get("function")
    if isinstance(function, dict):
        if isinstance(function.get("name"), str):
            call[0] += function["name"]
        if isinstance(function.get("arguments"), str):
            call[1] += function["arguments"]


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0
