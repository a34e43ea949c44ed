"""An output length guard: stops answers longer than a character limit, streamed or not."""

from __future__ import annotations

from typing import Any

from gateway.plugins import PluginDenied


class OutputLengthGuard:
    name = "output_length_guard"

    def __init__(self, *, max_chars: int = 20_000) -> None:
        if max_chars <= 0:
            raise ValueError("max_chars must be positive")
        self.max_chars = max_chars

    def on_request(self, body: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def on_chunk(self, chunk: dict[str, Any], state: dict[str, Any]) -> dict[str, Any] | None:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            state["chars"] = state.get("chars", 0) + len(delta.get("content") or choice.get("text") or "")
        self._check(state.get("chars", 0))
        return None

    def on_response(self, data: dict[str, Any]) -> dict[str, Any] | None:
        for choice in data.get("choices") or []:
            content = (choice.get("message") or {}).get("content") or choice.get("text") or ""
            self._check(len(content))
        return None

    def _check(self, chars: int) -> None:
        if chars > self.max_chars:
            raise PluginDenied(f"answer longer than {self.max_chars} characters", extra={"rule": "output_too_long"})
