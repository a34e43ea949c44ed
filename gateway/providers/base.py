"""The one Protocol every provider implements, the reply it returns, and what the wrappers
around providers (retries, deployments, fallbacks) share: the stream relay, the dialects.

Bodies arrive already checked by the PEP, with `model` set to the pinned upstream
model. Providers raise `UpstreamError`/`UpstreamTimeout` (or an `InvalidRequest` with
the upstream's 4xx status) and never put a key or an upstream URL in a message.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
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


def spoken_by_all(providers: Iterable[object]) -> tuple[frozenset[Endpoint], bool]:
    """What a wrapper over several providers speaks, since any of them may serve a call: the
    dialects every one lists in `native_endpoints`, and whether every one speaks chat."""
    native: frozenset[Endpoint] | None = None
    chat = True
    for provider in providers:
        spoken = frozenset(getattr(provider, "native_endpoints", ()))
        native = spoken if native is None else native & spoken
        chat = chat and bool(getattr(provider, "speaks_chat", True))
    return native or frozenset(), chat


@dataclass(slots=True)
class Opened:
    """A stream whose first payload has arrived: the one moment a wrapper can still retry,
    fall back or pick another deployment. `first` is None for a stream that ended at once."""

    first: bytes | None
    upstream: AsyncGenerator[bytes, None]
    on_close: Callable[[], None] | None = None  # after the upstream is closed, however it ended


async def first_payload(upstream: AsyncGenerator[bytes, None]) -> bytes | None:
    """The stream's first payload; if getting it fails (or is cancelled) the stream is closed."""
    try:
        return await anext(upstream, None)
    except BaseException:
        await upstream.aclose()
        raise


async def relay(open_stream: Callable[[], Awaitable[Opened]]) -> AsyncGenerator[bytes, None]:
    """What a provider wrapper's `stream` returns: opens the stream when first iterated (its
    choices made before any byte reached the client), then relays it; closing this closes
    the upstream, so a client that hangs up cancels the upstream call."""
    opened = await open_stream()
    try:
        if opened.first is not None:
            yield opened.first
            async for payload in opened.upstream:
                yield payload
    finally:
        try:
            await opened.upstream.aclose()
        finally:
            if opened.on_close is not None:
                opened.on_close()
