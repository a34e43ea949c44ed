"""tools/call and tools/list over streamable HTTP as one JSON-RPC POST each, on a session
the SDK's client opened.

The SDK's client stack (anyio streams, a task per request, pydantic models both ways) costs
more than the rest of a gateway call, so the hot requests skip it: the SDK still connects,
negotiates (initialize) and hears notifications; this POSTs on the same session, with its
`Mcp-Session-Id` and negotiated protocol version (on gateway.providers.transport, the
providers' lean HTTP/1.1 client), and reads the answer whether it comes as JSON or as an
SSE stream (taken as soon as its event is in; the stream's end is read after, off the
call's path, so the connection is kept for the next call).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Mapping
from typing import Any

import orjson

from gateway.errors import UpstreamError
from gateway.providers import transport
from gateway.providers.base import Reply

__all__ = ["SessionLost", "ToolPost"]

_SESSION_HEADER = "mcp-session-id"
_VERSION_HEADER = "mcp-protocol-version"
# What may follow an SSE answer before its stream ends, and for how long.
_FINISH_BYTES = 65536
_FINISH_S = 5.0
_FRAMING = transport.HeaderNames("content-type", "content-length")


class SessionLost(Exception):
    """The server no longer knows the session (restarted, expired): open a new one."""


class ToolPost:
    """POSTs tools/call to one server on one SDK-opened session; `max_bytes` bounds an answer,
    `timeout_s` each request (connecting included) until its answer is read: TimeoutError."""

    def __init__(self, name: str, url: str, max_bytes: int, timeout_s: float) -> None:
        self.name = name
        self._target = transport.Target.parse(url)  # parsed once, not on every POST
        self._headers: dict[str, str] = {}
        self._block = transport.encode_headers({})
        self._max_bytes = max_bytes
        # The transport's own deadline: one timer per connection, no asyncio.timeout per call.
        self._timeouts = transport.Timeouts(connect=timeout_s, total=timeout_s)
        self._ids = itertools.count(1)
        self._http: transport.Client | None = None
        self._finishing: set[asyncio.Task[None]] = set()

    def on_session(self, credentials: Mapping[str, str], session_id: str | None, protocol_version: str | None) -> None:
        """The session the SDK's client just opened (with the gateway's `credentials`); each
        later POST names it."""
        headers = {**credentials, "accept": "application/json, text/event-stream", "content-type": "application/json"}
        if session_id:
            headers[_SESSION_HEADER] = session_id
        if protocol_version:
            headers[_VERSION_HEADER] = protocol_version
        self._headers = headers
        self._block = transport.encode_headers(headers)  # encoded once per session

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
        try:
            answer = await self._exchange(method, message, rid)
        except asyncio.CancelledError:  # its client gave up on the call: tell the server too
            self._in_background(self._cancelled(rid))
            raise
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

    async def _exchange(self, method: str, message: dict[str, Any], rid: str) -> dict[str, Any] | None:
        """POST `message`; the JSON-RPC response to it, if the answer holds one."""
        if self._http is None:
            self._http = transport.Client()
        response = await self._http.request(self._target, orjson.dumps(message), self._block, self._timeouts)
        try:
            if response.status == 404 and _SESSION_HEADER in self._headers:
                raise SessionLost
            if response.status != 200:
                raise UpstreamError(f"tool server {self.name!r} answered {method} with HTTP {response.status}")
            answer = await self._read(response, rid)
        except orjson.JSONDecodeError:
            response.release()
            raise UpstreamError(f"tool server {self.name!r} answered {method} with something not JSON") from None
        except BaseException:
            response.release()  # the connection is kept only if it was read to the end
            raise
        if response.at_eof():
            response.release()
        else:
            self._finish_later(response)
        return answer

    async def _read(self, response: transport.Response, rid: str) -> dict[str, Any] | None:
        """The JSON-RPC response to `rid`. An SSE answer is read up to the event carrying it:
        the stream's end follows at once, and waiting for it would cost the call a wake-up."""
        # An SSE answer may carry notifications before the result: room for them too.
        cap = 2 * self._max_bytes + 65536
        framing = response.find_headers(_FRAMING)
        length = framing.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise UpstreamError(f"the answer of tool server {self.name!r} is larger than {cap} bytes")
        events = framing.get("content-type", "").lower().startswith("text/event-stream")
        parts: list[bytes] = []
        size = 0
        while part := await response.read_chunk():
            size += len(part)
            if size > cap:
                raise UpstreamError(f"the answer of tool server {self.name!r} is larger than {cap} bytes")
            parts.append(part)
            # An event ends with a blank line (one split between two reads is found at the end).
            if events and (b"\n\n" in part or b"\n\r\n" in part):
                answer = _answer(b"".join(parts), rid, events, ended=False)
                if answer is not None:
                    return answer
        return _answer(b"".join(parts), rid, events)

    def _finish_later(self, response: transport.Response) -> None:
        self._in_background(self._finish(response))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _cancelled(self, rid: str) -> None:
        """Tell the server that request `rid` was cancelled (its client gave up on it): the
        server may stop the work. Best effort: a failure here changes nothing."""
        notice = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": rid, "reason": "cancelled by the client"}}
        try:
            assert self._http is not None
            async with asyncio.timeout(_FINISH_S):
                response = await self._http.request(self._target, orjson.dumps(notice), self._block, self._timeouts)
                await response.read()
                response.release()
        except Exception:  # noqa: BLE001  # best effort, as the protocol says of cancellation
            pass

    async def _finish(self, response: transport.Response) -> None:
        """Read an answered SSE stream to its end, so its connection serves the next call; a
        stream that goes on past the answer (bytes or time), or breaks, is closed instead."""
        try:
            async with asyncio.timeout(_FINISH_S):
                size = 0
                while size <= _FINISH_BYTES and (part := await response.read_chunk()):
                    size += len(part)
        except Exception:  # noqa: BLE001  # timed out or broken: release() below closes it
            pass
        finally:
            response.release()  # back to the pool if read to the end, else closed

    async def close(self) -> None:
        for task in self._finishing:
            task.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None


def _answer(raw: bytes, rid: str, events: bool, *, ended: bool = True) -> dict[str, Any] | None:
    """The JSON-RPC response to `rid`: the body itself, or one of the SSE events' data (of
    the complete events only, while the stream has not `ended`)."""
    if not events:
        message = orjson.loads(raw)
        return message if isinstance(message, dict) and message.get("id") == rid else None
    found = raw.replace(b"\r\n", b"\n").split(b"\n\n")
    for event in found if ended else found[:-1]:
        data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            continue
        message = orjson.loads(data)
        if isinstance(message, dict) and message.get("id") == rid and ("result" in message or "error" in message):
            return message
    return None
