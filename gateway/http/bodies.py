"""Request and response bodies: size-limited JSON in (`application/json` only, parsed once
and strictly by `gateway.pipeline.request_body`), JSON out."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ValidationError

from gateway.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.http.keys import deps_of
from gateway.http.overload import refuse_encoded_body
from gateway.pipeline.request_body import parse_body

_UTF8 = frozenset({"utf-8", "utf8"})
# What nearly every client sends, accepted as it is: aiohttp parses any media type with
# the email package, which costs more than the rest of a request's header handling.
_PLAIN_JSON = frozenset({"application/json", "application/json; charset=utf-8", "application/json;charset=utf-8"})


async def read_json_object(request: web.Request) -> dict[str, Any]:
    body, _ = await read_json_request(request)
    return body


async def read_json_request(request: web.Request) -> tuple[dict[str, Any], bytes]:
    """The body parsed, and the bytes it came as (what the journal keeps)."""
    require_json(request)
    refuse_encoded_body(request)
    limit = deps_of(request).settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body over {limit} bytes") from None
    except HttpProcessingError:  # e.g. a broken chunked encoding: the client's fault
        raise InvalidRequest("malformed request body framing", code="invalid_body") from None
    return parse_body(raw), raw


def require_json(request: web.Request) -> None:
    """`Content-Type: application/json`, any case, with no charset or UTF-8 (RFC 8259). An
    absent header is refused too: a body must say what it is."""
    if request.headers.get(hdrs.CONTENT_TYPE, "").lower() in _PLAIN_JSON:
        return
    # aiohttp lower-cases the media type and parses the parameters.
    charset = request.charset
    if (
        hdrs.CONTENT_TYPE not in request.headers
        or request.content_type != "application/json"
        or (charset is not None and charset.lower() not in _UTF8)
    ):
        raise UnsupportedMediaType(
            "the request body must be JSON: send Content-Type: application/json (UTF-8)",
            param="Content-Type",
        )


def validated(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """`body` as `model`, or a 400 naming the first field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{where}: {first['msg']}", param=where or None) from None


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
