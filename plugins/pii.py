"""PII redaction: e-mail addresses, card-like numbers and phone numbers are masked in
prompts before they leave for the provider, and optionally in answers."""

from __future__ import annotations

import re
from typing import Any

_PATTERNS = (
    re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    re.compile(r"\b(?:\d[ -]?){13,19}\b"),
    re.compile(r"\+?\d{1,3}[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}\b"),
)
MASK = "[redacted]"


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(MASK, text)
    return text


def _redact_content(content: Any) -> Any:
    if isinstance(content, str):
        return redact(content)
    if isinstance(content, list):
        return [{**p, "text": redact(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p for p in content]
    return content


class PiiRedaction:
    name = "pii_redaction"

    def __init__(self, *, redact_answers: bool = False) -> None:
        self.redact_answers = redact_answers

    def on_request(self, body: dict[str, Any]) -> dict[str, Any] | None:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        cleaned = [{**m, "content": _redact_content(m.get("content"))} if isinstance(m, dict) else m for m in messages]
        return None if cleaned == messages else {**body, "messages": cleaned}

    def on_chunk(self, chunk: dict[str, Any], state: dict[str, Any]) -> dict[str, Any] | None:
        return None  # a number split across chunks can't be caught here; redact whole answers

    def on_response(self, data: dict[str, Any]) -> dict[str, Any] | None:
        if not self.redact_answers:
            return None
        choices = []
        for choice in data.get("choices") or []:
            message = choice.get("message") or {}
            if isinstance(message.get("content"), str):
                choice = {**choice, "message": {**message, "content": redact(message["content"])}}
            choices.append(choice)
        return {**data, "choices": choices}
