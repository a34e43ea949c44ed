"""Middlewares, outermost first: errors (request id, timing, translation, the request log
line and the request's trace span), overload (the in-flight cap, gateway/http/overload.py),
then auth.

Errors are translated to OpenAI's JSON shape here and only here. Anything unexpected
becomes a generic 500 carrying the request id and no exception text. Middleware never
reads or rewrites bodies.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError

from gateway.capability import bearer_token, constant_time_equals
from gateway.errors import (
    ClientGone,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthenticated,
)
from gateway.http.keys import ADMIN_LABEL, CLAIMS, REPORT, REQUEST_ID, deps_of, started_of
from gateway.request_log import LEVELS, CallReport
from gateway.tracing import NOOP
from gateway.translate import messages

log = logging.getLogger("gateway.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes reachable without a token. Everything else needs the admin token (/admin/...)
# or a VCS token; a new route is authenticated unless it is added here.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# The named exceptions under /admin, and only for GET/HEAD: the dashboards' HTML shells.
# A browser can't attach a bearer header to a page load, and the shell holds no data; it
# asks for the admin token and sends it on each API call (see gateway/http/dashboard.py).
TOKENLESS_ADMIN_PAGES = frozenset({"/admin/dashboard", "/admin/dashboard/plans"})
ADMIN_PREFIX = "/admin/"
# Anthropic's route: its SDK sends the key as `x-api-key` and reads Anthropic's error shape.
ANTHROPIC_PATHS = frozenset({"/v1/messages"})


def error_response(exc: GatewayError, request_id: str, path: str = "") -> web.Response:
    headers = {"x-request-id": request_id}
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    retry_after = exc.extra.get("retry_after_s")
    if isinstance(retry_after, int):
        headers["retry-after"] = str(retry_after)
    body = messages.error_body(exc, request_id) if path in ANTHROPIC_PATHS else exc.to_json()
    return web.Response(status=exc.status, body=body, content_type="application/json", headers=headers)


def _http_error(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("request body too large")
    if exc.status == 404:
        return NotFound("unknown route", code="unknown_route")
    if exc.status == 405:
        return MethodNotAllowed("method not allowed")
    if exc.status < 500:
        return InvalidRequest(exc.reason or "request failed", code="http_error", status=exc.status)
    return InternalError(exc.reason or "request failed", code="http_error", status=exc.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("x-request-id", "")
    if not (0 < len(request_id) <= 64 and request_id.isascii() and request_id.replace("-", "").replace("_", "").isalnum()):
        request_id = "req_" + secrets.token_hex(12)
    request[REQUEST_ID] = request_id
    resource = request.match_info.route.resource
    report = request[REPORT] = CallReport(route=resource.canonical if resource else "unmatched")
    deps = deps_of(request)
    deps.metrics.request_started()
    started = time.perf_counter()
    try:
        tracer = NOOP if request.path in PUBLIC_PATHS else deps.tracer  # probes and scrapes: no spans
        with tracer.request(request.method, report.route) as span:
            response = await _translated(request, handler, request_id, report)
            span.set_attribute("http.response.status_code", report.status)
        return response
    finally:
        elapsed = time.perf_counter() - started
        deps.metrics.observe_request(report.route, report.status, elapsed)
        _log(request, request_id, report, elapsed)


async def _translated(request: web.Request, handler: Handler, request_id: str, report: CallReport) -> web.StreamResponse:
    report.status = 500
    try:
        response = await handler(request)
        report.status = response.status
        if not response.prepared:
            # setdefault: a stored idempotent answer keeps the id of the request that made it.
            response.headers.setdefault("x-request-id", request_id)
        return response
    except ClientGone:
        # An ordinary event, settled by the exchange; nobody is left to read an answer.
        report.status, report.code = ClientGone.status, ClientGone.code
        log.info("client hung up on request %s", request_id)
        return web.Response(status=ClientGone.status)
    except (asyncio.CancelledError, ConnectionResetError):
        report.status, report.code = ClientGone.status, ClientGone.code  # gone before the exchange saw it
        raise
    except GatewayError as exc:
        if exc.status == 503:
            deps_of(request).metrics.observe_redis_error("request")
        started = started_of(request)
        if started is not None:
            # The stream's status line went out: it ended with an error event, not a second response.
            report.status, report.code = started.status, exc.code
            return started
        report.status, report.code = exc.status, exc.code
        return error_response(exc, request_id, request.path)
    except (RedisError, RedisClusterException):
        # Whatever path touched Redis, its trouble fails closed: 503, nothing forwarded.
        deps_of(request).metrics.observe_redis_error("request")
        unavailable = ServiceUnavailable("state store unavailable; request not served")
        report.status, report.code = unavailable.status, unavailable.code
        return error_response(unavailable, request_id, request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            report.status = exc.status
            raise
        err = _http_error(exc)
        report.status, report.code = err.status, err.code
        return error_response(err, request_id, request.path)
    except Exception:
        log.exception("unhandled error in request %s", request_id)
        report.code = "internal_error"
        started = started_of(request)
        if started is not None:
            report.status = started.status
            return started
        return error_response(GatewayError(f"internal error (request id {request_id})"), request_id, request.path)


def _log(request: web.Request, request_id: str, report: CallReport, elapsed: float) -> None:
    if request.path in PUBLIC_PATHS:
        level = LEVELS["debug"]  # probes and scrapes: every few seconds, for ever
    else:
        level = LEVELS["error"] if report.status >= 500 else LEVELS["warning"] if report.status >= 400 else LEVELS["info"]
    request_log = deps_of(request).request_log
    if not request_log.enabled(level):
        return
    claims = request.get(CLAIMS)
    if claims is not None:
        report.session_id, report.assembly_id, report.tenant = claims.session_id, claims.assembly_id, claims.tenant
    if report.gateway_ms is None:
        report.gateway_ms = round(elapsed * 1000, 3)  # no upstream call: all of it was ours
    request_log.write(request_id, report, level=level)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path in PUBLIC_PATHS or (
        path in TOKENLESS_ADMIN_PAGES and request.method in ("GET", "HEAD")
    ):
        return await handler(request)
    deps = deps_of(request)
    token = bearer_token(request.headers.get("Authorization"))
    if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/"):
        admin = deps.settings.admin_token
        if admin is None:
            raise Unauthenticated("admin API disabled: set ABC_ADMIN_TOKEN", code="admin_disabled")
        if token is None or not constant_time_equals(token, admin.get_secret_value()):
            raise Unauthenticated("invalid admin token")
        request[ADMIN_LABEL] = deps.settings.admin_token_label
        return await handler(request)
    if token is None and path in ANTHROPIC_PATHS:
        token = request.headers.get("x-api-key") or None
    if token is None:
        raise Unauthenticated("missing bearer token: use the session's VCS token as the API key")
    request[CLAIMS] = deps.verifier.verify(token)
    return await handler(request)
