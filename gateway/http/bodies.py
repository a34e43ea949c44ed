"""Request and response bodies: size-limited JSON in (parsed once, objects only), JSON out."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.http.keys import deps_of
from gateway.http.overload import refuse_encoded_body

# orjson reads 1024 levels but writes only 254, and every body is written again (journal,
# request hash, upstream); deeper ones are refused here rather than failing later as a 500.
MAX_DEPTH = 128


async def read_json_object(request: web.Request) -> dict[str, Any]:
    body, _ = await read_json_request(request)
    return body


async def read_json_request(request: web.Request) -> tuple[dict[str, Any], bytes]:
    """The body parsed, and the bytes it came as (what the journal keeps)."""
    refuse_encoded_body(request)
    limit = deps_of(request).settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body over {limit} bytes") from None
    return parse_body(raw), raw


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body's bytes as a JSON object, or the 400 that says why not."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("malformed JSON body", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    # Counting brackets is C-speed; only a body with that many containers is walked.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and _too_deep(body):
        message = f"the request body is nested deeper than {MAX_DEPTH} levels"
        raise InvalidRequest(message, code="invalid_json")
    return body


def _too_deep(body: dict[str, Any]) -> bool:
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


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
