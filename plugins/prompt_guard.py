"""`prompt_guard`: denies requests whose user or tool messages carry well-known
instruction-override phrases, and any text or tool-call arguments (in the request's
history or in the answer, streamed or not) that match the plan's `deny_patterns`.
A screen, not a proof: it catches the obvious and what the plan names.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field

from gateway.assembly.model import Assembly
from gateway.plugins import PluginDenied, PluginOptions, Scratch

_PHRASES = re.compile(
    r"ignore (all |any )?(the )?(previous|prior|above|earlier) (instructions|prompts|rules)"
    r"|disregard (all |the |your )?(system|previous|prior) (prompt|instructions|rules)"
    r"|forget (all |everything )?(you were told|your (instructions|rules))"
    r"|you are now (dan|in developer mode|unrestricted|jailbroken)"
    r"|(reveal|print|repeat) (your|the) (system prompt|hidden instructions)"
    r"|new instructions\s*:",
    re.IGNORECASE,
)


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


Pattern = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_regex)]


class PromptGuardOptions(PluginOptions):
    phrases: bool = True  # screen the built-in instruction-override phrases
    roles: tuple[str, ...] = ("user", "tool")  # whose messages are screened
    deny_patterns: tuple[Pattern, ...] = ()  # on screened messages and every tool call's arguments
    ignore_case: bool = True


class PromptGuard:
    name: ClassVar[str] = "prompt_guard"
    version: ClassVar[str] = "1.0.0"
    session_counters: tuple[str, ...] = ()
    Options: ClassVar[type[PluginOptions]] = PromptGuardOptions

    def __init__(self, options: PromptGuardOptions, assembly: Assembly) -> None:
        self.phrases = options.phrases
        self.roles = frozenset(options.roles)
        flags = re.IGNORECASE if options.ignore_case else 0
        self.deny = [re.compile(p, flags) for p in options.deny_patterns]

    def on_request(self, body: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        messages = body.get("messages")
        for i, message in enumerate(messages if isinstance(messages, list) else []):
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if isinstance(role, str) and role in self.roles:  # a client may send any JSON here
                text = _text(message.get("content"))
                if self.phrases and _PHRASES.search(text):
                    raise PluginDenied(
                        f"message {i} looks like a prompt injection", param=f"messages.{i}",
                        extra={"rule": "prompt_injection"},
                    )
                self._screen(text, f"messages.{i}.content")
            for j, arguments in enumerate(_arguments(message)):
                self._screen(arguments, f"messages.{i}.tool_calls.{j}")
        return None

    def on_chunk(self, chunk: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        if not self.deny:
            return None
        calls: dict[tuple[int, int], str] = scratch.data.setdefault("calls", {})
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            fragments = delta.get("tool_calls") if isinstance(delta, dict) else None
            for fragment in fragments if isinstance(fragments, list) else []:
                function = fragment.get("function") if isinstance(fragment, dict) else None
                piece = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(piece, str) and piece:
                    key = (_int(choice.get("index")), _int(fragment.get("index")))
                    calls[key] = calls.get(key, "") + piece
                    # Before this chunk goes out: the fragment that completes a match never does.
                    self._screen(calls[key], "tool_calls", answer=True)
        return None

    def on_stream_end(self, last: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        return None

    def on_response(self, data: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        if not self.deny:
            return None
        for choice in data.get("choices") or []:
            message = choice.get("message") if isinstance(choice, dict) else None
            for arguments in _arguments(message):
                self._screen(arguments, "tool_calls", answer=True)
        return None

    def _screen(self, text: str, where: str, *, answer: bool = False) -> None:
        for pattern in self.deny:
            if pattern.search(text):
                what = "the answer's tool call arguments" if answer else where
                raise PluginDenied(
                    f"{what} match a pattern this plan denies", param=None if answer else where,
                    extra={"rule": "denied_pattern"},
                )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _arguments(message: Any) -> list[str]:
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            out.append(function["arguments"])
    return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0
