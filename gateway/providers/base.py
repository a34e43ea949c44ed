"""The one Protocol every provider implements, and the reply it returns.

Bodies arrive already checked by the PEP, with `model` set to the pinned upstream
model. Providers raise `UpstreamError`/`UpstreamTimeout` (or an `InvalidRequest` with
the upstream's 4xx status) and never put a key or an upstream URL in a message.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol


class Endpoint(enum.StrEnum):
    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    # Dialects the PEP checks in chat form; only a provider listing them in
    # `native_endpoints` is sent them as they are (see gateway.pipeline.dialects).
    RESPONSES = "responses"
    MESSAGES = "messages"
    # An MCP tools/call (gateway.mcp): only a tool server's provider answers it.
    TOOLS_CALL = "mcp/tools/call"


@dataclass(slots=True)
class Reply:
    """A complete, successful upstream answer."""

    body: bytes  # the JSON bytes exactly as they will be sent to the client
    data: dict[str, Any]  # `body`, parsed once
    # Upstream response headers from an allow-list (see openai_compat.PASSTHROUGH_HEADERS).
    headers: dict[str, str] = field(default_factory=dict)


class Provider(Protocol):
    name: str

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        """One non-streaming call; `request_id` is the gateway's, for the upstream's logs."""
        ...

    def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """A streaming call: yields the JSON payload of each SSE `data:` event, `[DONE]` excluded.

        Before the first payload, allow-listed upstream response headers are put in
        `headers_out` (when given), so the relay can pass them on with its own.

        Closing the iterator early (client gone) must cancel the upstream call.
        """
        ...

    async def close(self) -> None: ...
