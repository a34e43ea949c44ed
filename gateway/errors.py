"""Every error the gateway can answer with, and its OpenAI-shaped JSON.

    Exception
    ├── ConfigError                 operator mistakes: bad settings, bad plans; never a request's fault
    └── GatewayError                one request failed; status/type/code say how
        ├── InvalidRequest          400  malformed JSON or HTTP, duplicate keys, bad fields
        │   ├── MethodNotAllowed    405  a route asked with the wrong method
        │   ├── PayloadTooLarge     413  body over `server.max_body_bytes`
        │   ├── UriTooLong          414  request line over aiohttp's limit
        │   ├── UnsupportedMediaType 415 a body that is not `application/json`
        │   └── HeaderTooLarge      431  a header, or the header count, over aiohttp's limits
        ├── Unauthenticated         401  missing, bad, expired or revoked token
        ├── CapabilityDenied        403  not in the VCS (model, tool, parameter, upstream override)
        ├── NotFound                404  unknown model or route
        ├── StateConflict           409  step out of order, replay divergence
        ├── BudgetExceeded          429  session/tenant budget would be exceeded
        ├── RateLimited             429  RPM/TPM limit
        │   └── UpstreamRateLimited 429  the upstream throttles the gateway's key
        ├── ServiceUnavailable      503  Redis down or slow: we fail closed; a plugin missing here
        │   └── Overloaded          503  past the in-flight cap; carries Retry-After
        ├── UpstreamError           502  provider failed or answered garbage
        │   └── UpstreamUnavailable 502  unreachable, reset, or 500/502/503/504: worth a retry
        ├── UpstreamTimeout         504  provider too slow
        ├── ClientGone              499  the client hung up; logged at info, never a traceback
        ├── RequestCancelled        499  the gateway stopped the work (shutdown, cancellation)
        └── InternalError           500  a bug; journaled by class name, answered without text

Budget exhaustion is 429 (not 402) everywhere: the OpenAI SDK maps 429 to
RateLimitError, which clients already handle, and 402 has no SDK class.
Errors are translated to JSON once, in `gateway.http.middlewares` (or, for requests
aiohttp could not parse, in `gateway.http.protocol`).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "BudgetExceeded",
    "CapabilityDenied",
    "ClientGone",
    "ConfigError",
    "GatewayError",
    "HeaderTooLarge",
    "InternalError",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "RequestCancelled",
    "ServiceUnavailable",
    "StateConflict",
    "Unauthenticated",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UriTooLong",
]


class ConfigError(Exception):
    """An operator mistake in settings or a plan; raised at start or compile time."""


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:  # e.g. an upstream 422 passed through as itself
            self.status = status
        # Extra, non-secret details for the client (allowed steps, budget left, a diff).
        self.extra = extra or {}

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        error.update(self.extra)
        return {"error": error}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class UriTooLong(InvalidRequest):
    status = 414
    code = "uri_too_long"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class HeaderTooLarge(InvalidRequest):
    status = 431
    code = "request_header_fields_too_large"


class Unauthenticated(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class CapabilityDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "capability_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class StateConflict(GatewayError):
    status = 409
    type = "conflict_error"
    code = "step_not_allowed"


class BudgetExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class Overloaded(ServiceUnavailable):
    code = "overloaded"  # extra["retry_after_s"] becomes the Retry-After header


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    """A failure another attempt may cure; `retry_after_s` is the upstream's Retry-After.
    Clients see it as any upstream error: the class only tells the gateway it may retry."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class UpstreamRateLimited(RateLimited):
    """The upstream answered 429: the gateway's key is throttled, not the client."""

    code = "upstream_rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ClientGone(GatewayError):
    status = 499  # nginx's "client closed request": nobody reads it, the journal does
    type = "client_error"
    code = "client_disconnected"


class RequestCancelled(GatewayError):
    status = 499
    type = "server_error"
    code = "cancelled"


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"
