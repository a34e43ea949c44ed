"""A prompt-injection screen: denies requests whose user or tool content carries
well-known instruction-override phrases. A screen, not a proof: it catches the obvious."""

from __future__ import annotations

import re
from typing import Any

from gateway.plugins import PluginDenied

_PHRASES = re.compile(
    r"ignore (all |any )?(previous|prior|above) (instructions|prompts)"
    r"|disregard (the |your )?(system|previous) (prompt|instructions)"
    r"|you are now (dan|in developer mode)"
    r"|reveal (your|the) (system prompt|hidden instructions)",
    re.IGNORECASE,
)


class InjectionScreen:
    name = "injection_screen"

    def __init__(self, *, roles: tuple[str, ...] = ("user", "tool")) -> None:
        self.roles = roles

    def on_request(self, body: dict[str, Any]) -> dict[str, Any] | None:
        for i, message in enumerate(body.get("messages") or []):
            if not isinstance(message, dict) or message.get("role") not in self.roles:
                continue
            content = message.get("content")
            text = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
            if _PHRASES.search(text):
                raise PluginDenied(f"message {i} looks like a prompt injection", param=f"messages.{i}", extra={"rule": "prompt_injection"})
        return None

    def on_chunk(self, chunk: dict[str, Any], state: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def on_response(self, data: dict[str, Any]) -> dict[str, Any] | None:
        return None
