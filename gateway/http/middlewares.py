"""Middlewares, outermost first: errors (request id, timing, translation), then auth.

Errors are translated to OpenAI's JSON shape here and only here. Anything unexpected
becomes a generic 500 carrying the request id and no exception text. Middleware never
reads or rewrites bodies.
"""

from __future__ import annotations

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
from gateway.http.keys import CLAIMS, REQUEST_ID, deps_of

log = logging.getLogger("gateway.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes reachable without a token. Everything else needs the admin token (/admin/...)
# or a VCS token; a new route is authenticated unless it is added here.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# The one named exception under /admin, and only for GET/HEAD: the dashboard's HTML shell.
# A browser can't attach a bearer header to a page load, and the shell holds no data; it
# asks for the admin token and sends it on each API call (see gateway/http/dashboard.py).
TOKENLESS_ADMIN_PAGES = frozenset({"/admin/dashboard"})
ADMIN_PREFIX = "/admin/"


def error_response(exc: GatewayError, request_id: str) -> web.Response:
    headers = {"x-request-id": request_id}
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    retry_after = exc.extra.get("retry_after_s")
    if isinstance(retry_after, int):
        headers["retry-after"] = str(retry_after)
    return web.Response(status=exc.status, body=exc.to_json(), content_type="application/json", headers=headers)


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
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            # setdefault: a stored idempotent answer keeps the id of the request that made it.
            response.headers.setdefault("x-request-id", request_id)
        return response
    except ClientGone:
        # An ordinary event, settled by the exchange; nobody is left to read an answer.
        status = ClientGone.status
        log.info("client hung up on request %s", request_id)
        return web.Response(status=status)
    except GatewayError as exc:
        status = exc.status
        return error_response(exc, request_id)
    except (RedisError, RedisClusterException):
        # Whatever path touched Redis, its trouble fails closed: 503, nothing forwarded.
        status = 503
        return error_response(ServiceUnavailable("state store unavailable; request not served"), request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = _http_error(exc)
        status = err.status
        return error_response(err, request_id)
    except Exception:
        log.exception("unhandled error in request %s", request_id)
        return error_response(GatewayError(f"internal error (request id {request_id})"), request_id)
    finally:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        deps_of(request).metrics.observe_request(route, status, time.perf_counter() - started)


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
        return await handler(request)
    if token is None:
        raise Unauthenticated("missing bearer token: use the session's VCS token as the API key")
    request[CLAIMS] = deps.verifier.verify(token)
    return await handler(request)
