"""POST /mcp: the gateway as an MCP server (streamable HTTP) serving the session's tools only.

The whole JSON-RPC layer is here, on aiohttp. The auth middleware has already checked the
VCS token (else HTTP 401, before any JSON-RPC). A request is answered with one JSON body
(the transport lets the server choose; the gateway never has anything to send before its
one answer), or one SSE `message` event for a client that prefers `text/event-stream`
(lists it before JSON, or does not take JSON). The SDK's client lists JSON first; it also
closes an SSE response as soon as it has the answer, before the body's end, so answering
it in SSE would cost a new TCP connection per call.
Notifications and responses get 202. A `notifications/cancelled` naming a tools/call
that runs on this replica stops it if its server has not answered yet: the upstream
POST is dropped and the cancellation passed on to the server, the call settles as
`cancelled` (charged nothing), and its POST is answered with that refusal. Versions:
the initialize handshake's (the SDK's client falls back to it when `server/discover` is
not found). The MCP session is the ABC session: `Mcp-Session-Id` is the session id, so
every replica knows it without shared state. A browser page's request is refused (403)
unless its Origin may call /mcp (gateway.mcp.origins: DNS rebinding). No
server-initiated stream (GET is 405) and no resources, prompts, sampling or completion:
those are denied.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.errors import CapabilityDenied, GatewayError, InvalidRequest, RequestCancelled
from gateway.http.keys import REQUEST_ID, claims_of, deps_of, report_of
from gateway.mcp import origins
from gateway.money import nanos_to_usd_str
from gateway.pipeline.exchange import Call, exchange, journal_refusal, require_live_session
from gateway.providers.base import Endpoint

__all__ = ["add_routes"]

ADMITTING, SENDING, ANSWERED = range(3)


@dataclass(slots=True)
class _Running:
    """A tools/call in flight on this replica, for its client's `notifications/cancelled`."""

    key: tuple[str, bytes]  # (session, JSON-RPC id)
    task: asyncio.Task[Any]
    phase: int = ADMITTING  # SENDING: waits for the server, the one phase a cancellation interrupts
    cancelled: bool = False  # by the client (else a CancelledError is the gateway's own: shutdown)


IN_FLIGHT = web.AppKey("mcp_in_flight", dict[tuple[str, bytes], _Running])  # by their key

PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
REFUSED = -32000  # server-defined: a gateway refusal; data.code says which
CANCELLED_BY_CLIENT = "request cancelled by the client"
_NOT_SERVED = ("resources/", "prompts/", "sampling/", "completion/", "logging/", "roots/", "elicitation/", "tasks/")


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


async def post_mcp(request: web.Request) -> web.StreamResponse:
    claims = claims_of(request)
    origin = request.headers.get("Origin")
    if origin is not None and not origins.allowed(origin, deps_of(request).settings.server.mcp_allowed_origins):
        return await _refuse_origin(request)
    session = request.headers.get(SESSION_HEADER)
    if session is not None and session != claims.session_id:
        return _answer(request, _error(None, INVALID_REQUEST, "unknown MCP session"), status=404)
    version = request.headers.get(VERSION_HEADER)
    if version is not None and version not in PROTOCOL_VERSIONS:
        return _answer(request, _error(None, INVALID_REQUEST, f"unsupported {VERSION_HEADER}"), status=400)
    if request.content_type != "application/json":
        return _answer(request, _error(None, INVALID_REQUEST, "Content-Type must be application/json"), status=415)
    try:
        message = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _answer(request, _error(None, PARSE_ERROR, "body is not JSON"), status=400)
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _answer(request, _error(None, INVALID_REQUEST, "one JSON-RPC 2.0 message per POST"), status=400)
    if "method" not in message or "id" not in message:
        if message.get("method") == "notifications/cancelled":
            _cancel(request, claims.session_id, message.get("params"))
        return web.Response(status=202)  # a notification or a response: nothing to answer
    rid = message["id"]
    headers: dict[str, str] = {}
    running = _track(request, claims.session_id, rid) if message["method"] == "tools/call" else None
    try:
        result = await _dispatch(request, str(message["method"]), message.get("params"), headers, running)
        payload: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "result": result}
    except asyncio.CancelledError:
        if running is None or not running.cancelled:
            raise  # the gateway's own cancellation (shutdown): not the client's to answer
        running.task.uncancel()
        payload = _refusal(rid, RequestCancelled(CANCELLED_BY_CLIENT))
    except RpcError as exc:
        payload = _error(rid, exc.code, exc.message, exc.data)
    except GatewayError as exc:
        if exc.status == 401:
            raise  # a dead session is HTTP 401, like a bad token
        payload = _refusal(rid, exc)
    finally:
        if running is not None and request.app[IN_FLIGHT].get(running.key) is running:
            del request.app[IN_FLIGHT][running.key]
    return _answer(request, payload, headers=headers)


def _track(request: web.Request, session_id: str, rid: Any) -> _Running | None:
    task = asyncio.current_task()
    if task is None:
        return None
    running = _Running((session_id, _rid_key(rid)), task)
    request.app[IN_FLIGHT][running.key] = running
    return running


def _rid_key(rid: Any) -> bytes:
    """A JSON-RPC id as a dict key: 1 and "1" are different ids."""
    return orjson.dumps(rid)


def _cancel(request: web.Request, session_id: str, params: Any) -> None:
    """Stop this session's tools/call named by a `notifications/cancelled`, if it runs here:
    at once while it waits for its server; before it is sent while it is being admitted;
    not once the server answered (the answer is being settled and goes out)."""
    if not isinstance(params, dict) or "requestId" not in params:
        return
    running = request.app[IN_FLIGHT].get((session_id, _rid_key(params["requestId"])))
    if running is None or running.phase == ANSWERED or running.cancelled:
        return
    running.cancelled = True
    if running.phase == SENDING:
        running.task.cancel()


async def _refuse_origin(request: web.Request) -> web.Response:
    """403 for a browser page of an origin not allowed (see gateway.mcp.origins), journaled as
    a denial in the token's session: nothing was reserved or sent."""
    refused = CapabilityDenied("this Origin may not call /mcp (server.mcp_allowed_origins)", code="origin_not_allowed")
    answer = await journal_refusal(deps_of(request), claims_of(request), request[REQUEST_ID], refused)
    if answer is not refused:
        raise answer  # the session is dead: 401, as for a bad token
    data = {"code": refused.code, "status": refused.status, "type": refused.type}
    return _answer(request, _error(None, INVALID_REQUEST, refused.message, data), status=403)


async def _dispatch(
    request: web.Request, method: str, params: Any, headers: dict[str, str], running: _Running | None = None,
) -> Any:
    deps, claims = deps_of(request), claims_of(request)
    if method == "tools/call":
        # The one lifecycle, with the tool's pieces (gateway.mcp.policy, gateway.mcp.provider).
        call = Call(request[REQUEST_ID], Endpoint.TOOLS_CALL, _call_params(params), claims, report=report_of(request))
        async with exchange(deps, call) as ex:
            if running is not None:
                if running.cancelled:  # while it was admitted: never sent
                    raise RequestCancelled(CANCELLED_BY_CLIENT)
                running.phase = SENDING
            body = await ex.send()
            if running is not None:
                running.phase = ANSWERED
        assert ex.settled is not None
        headers["x-abc-cost-usd"] = nanos_to_usd_str(ex.settled.cost_nanos)
        if ex.settled.budget_left_nanos >= 0:
            headers["x-abc-budget-remaining-usd"] = nanos_to_usd_str(ex.settled.budget_left_nanos)
        return orjson.Fragment(body)
    if method == "ping":
        return {}
    if method.startswith(_NOT_SERVED):
        raise RpcError(METHOD_NOT_FOUND, f"{method} is not offered by this gateway", {"code": "capability_denied"})
    if method not in ("initialize", "tools/list"):
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {method[:64]}")
    await require_live_session(deps, claims.session_id)
    if method == "initialize":
        headers[SESSION_HEADER] = claims.session_id
        return _initialize(params)
    assembly = await deps.assemblies.get(claims.assembly_id)
    return {"tools": [_listed(name, tool) for name, tool in sorted(assembly.mcp.items())]}


def _call_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "tools/call params must be an object")
    return {key: value for key, value in params.items() if key != "_meta"}  # progress tokens are not the call


def _initialize(params: Any) -> dict[str, Any]:
    wanted = params.get("protocolVersion") if isinstance(params, dict) else None
    return {
        "protocolVersion": wanted if wanted in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1],
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "abc-gateway", "version": __version__},
        "instructions": "Tools of this session's Assembly, frozen at compile time; each call is budgeted and journaled.",
    }


def _listed(name: str, tool: Any) -> dict[str, Any]:
    listed: dict[str, Any] = {"name": name, "description": tool.description, "inputSchema": tool.input_schema}
    if tool.output_schema is not None:
        listed["outputSchema"] = tool.output_schema
    if tool.annotations is not None:
        listed["annotations"] = tool.annotations
    return listed


def _refusal(rid: Any, exc: GatewayError) -> dict[str, Any]:
    data = {"code": exc.code, "status": exc.status, "type": exc.type, **exc.extra}
    if isinstance(exc, InvalidRequest) and exc.code in ("invalid_params", "invalid_arguments"):
        return _error(rid, INVALID_PARAMS, exc.message, data)
    return _error(rid, REFUSED, exc.message, data)


def _error(rid: Any, code: int, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": error}


def _answer(request: web.Request, payload: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps(payload)
    headers = {"x-abc-session": claims_of(request).session_id, **(headers or {})}
    if status == 200 and _prefers_events(request.headers.get("Accept", "")):
        # One event, then the stream ends: the response is complete, nothing is held open.
        return web.Response(body=b"event: message\ndata: " + body + b"\n\n", content_type="text/event-stream", headers=headers)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _prefers_events(accept: str) -> bool:
    """Whether the client lists `text/event-stream` before any range that takes JSON
    (`application/json`, `application/*`, `*/*`), or takes SSE and not JSON."""
    if "text/event-stream" not in accept:
        return False
    for part in accept.split(","):
        media = part.partition(";")[0].strip().lower()
        if media == "text/event-stream":
            return True
        if media in ("application/json", "application/*", "*/*"):
            return False
    return False


async def not_allowed(request: web.Request) -> web.Response:
    # No server-initiated stream (GET) and no session to end (DELETE): the SDK's client expects 405.
    return web.Response(status=405, headers={"Allow": "POST"})


def add_routes(app: web.Application) -> None:
    app[IN_FLIGHT] = {}
    app.router.add_post("/mcp", post_mcp)
    app.router.add_get("/mcp", not_allowed)
    app.router.add_delete("/mcp", not_allowed)
