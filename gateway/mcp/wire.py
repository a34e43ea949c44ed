"""tools/call and tools/list over streamable HTTP as one JSON-RPC POST each, on a session
the SDK's client opened.

The SDK's client stack (anyio streams, a task per request, pydantic models both ways) costs
more than the rest of a gateway call, so the hot requests skip it: the SDK still connects,
negotiates (initialize) and hears notifications; this POSTs on the same session, with its
`Mcp-Session-Id` and negotiated protocol version, and reads the answer whether it comes
as JSON or as an SSE stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
import yarl

from gateway.errors import UpstreamError
from gateway.providers.base import Reply

__all__ = ["SessionLost", "ToolPost"]

_SESSION_HEADER = "mcp-session-id"
_VERSION_HEADER = "mcp-protocol-version"


class SessionLost(Exception):
    """The server no longer knows the session (restarted, expired): open a new one."""


class ToolPost:
    """POSTs tools/call to one server on one SDK-opened session; `max_bytes` bounds an answer."""

    def __init__(self, name: str, url: str, max_bytes: int) -> None:
        self.name = name
        self._url = yarl.URL(url)  # parsed once, not on every POST
        self._headers: dict[str, str] = {}
        self._max_bytes = max_bytes
        self._ids = itertools.count(1)
        self._http: aiohttp.ClientSession | None = None

    def on_session(self, credentials: Mapping[str, str], session_id: str | None, protocol_version: str | None) -> None:
        """The session the SDK's client just opened (with the gateway's `credentials`); each
        later POST names it."""
        headers = {**credentials, "accept": "application/json, text/event-stream", "content-type": "application/json"}
        if session_id:
            headers[_SESSION_HEADER] = session_id
        if protocol_version:
            headers[_VERSION_HEADER] = protocol_version
        self._headers = headers

    async def call(self, tool: str, arguments: Mapping[str, Any]) -> Reply:
        """tools/call: the CallToolResult, its JSON as the server sent it."""
        result = await self.request("tools/call", {"name": tool, "arguments": arguments})
        if not isinstance(result.get("content", []), list):
            raise UpstreamError(f"tool server {self.name!r} sent a malformed tools/call result")
        return Reply(body=orjson.dumps(result), data=result)

    async def request(self, method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """One JSON-RPC request; its result object. A JSON-RPC error is an UpstreamError."""
        # Ids of their own: the SDK's client numbers its requests on the same session from 0.
        rid = f"abc-{next(self._ids)}"
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        if self._http is None:
            # No cookies and no timers of its own: ToolServer bounds each call with its timeout.
            self._http = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None),
            )
        async with self._http.post(self._url, data=orjson.dumps(message), headers=self._headers, allow_redirects=False) as response:
            if response.status == 404 and _SESSION_HEADER in self._headers:
                raise SessionLost
            if response.status != 200:
                raise UpstreamError(f"tool server {self.name!r} answered {method} with HTTP {response.status}")
            raw = await self._read(response)
            events = response.content_type == "text/event-stream"
        try:
            answer = _answer(raw, rid, events)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"tool server {self.name!r} answered {method} with something not JSON") from None
        if answer is None:
            raise UpstreamError(f"tool server {self.name!r} sent no answer to {method}")
        error = answer.get("error")
        if error is not None:
            code = error.get("code") if isinstance(error, dict) else None
            raise UpstreamError(f"tool server {self.name!r} refused {method} (JSON-RPC error {code})")
        result = answer.get("result")
        if not isinstance(result, dict):
            raise UpstreamError(f"tool server {self.name!r} sent a malformed {method} result")
        return result

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        # An SSE answer may carry notifications before the result: room for them too.
        cap = 2 * self._max_bytes + 65536
        if response.content_length is not None and response.content_length > cap:
            raise UpstreamError(f"the answer of tool server {self.name!r} is larger than {cap} bytes")
        parts: list[bytes] = []
        size = 0
        async for part in response.content.iter_any():
            size += len(part)
            if size > cap:
                raise UpstreamError(f"the answer of tool server {self.name!r} is larger than {cap} bytes")
            parts.append(part)
        return b"".join(parts)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def _answer(raw: bytes, rid: str, events: bool) -> dict[str, Any] | None:
    """The JSON-RPC response to `rid`: the body itself, or one of the SSE events' data."""
    if not events:
        message = orjson.loads(raw)
        return message if isinstance(message, dict) and message.get("id") == rid else None
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            continue
        message = orjson.loads(data)
        if isinstance(message, dict) and message.get("id") == rid and ("result" in message or "error" in message):
            return message
    return None
