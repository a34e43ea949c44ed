"""Reading request bodies: size-limited, parsed once with orjson, objects only."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.http.keys import deps_of


async def read_json_object(request: web.Request) -> dict[str, Any]:
    limit = deps_of(request).settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body over {limit} bytes") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("malformed JSON body", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body
