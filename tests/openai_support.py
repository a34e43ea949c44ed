"""What the HTTP and e2e tests share: SDK clients bound to a running gateway, the OpenAI
error-shape check, a journal reader, and the check that a gateway never answered 5xx-500."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson

from gateway import redis_keys
from gateway.state.entries import entry_body
from tests.conftest import Gateway, assert_no_server_errors  # noqa: F401  (re-exported)
from tests.redis_proc import client_for

TIMEOUT_S = 30.0


def sdk(gw: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.openai_base, api_key=token, max_retries=0, timeout=TIMEOUT_S)


def async_sdk(gw: Gateway, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gw.openai_base, api_key=token, max_retries=0, timeout=TIMEOUT_S
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert `response` is an OpenAI-shaped error with `status`; return its `error` object."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= error.keys()
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def journal(redis_url: str, session_id: str) -> list[dict[str, Any]]:
    """A session's journal entries in order, fields decoded and `body` decompressed."""
    client = client_for(redis_url)
    try:
        raw = client.xrange(redis_keys.journal(session_id))
    finally:
        client.close()
    entries = []
    for _, fields in raw:
        entry: dict[str, Any] = {
            k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"body"
        }
        body = entry_body(fields)
        entry["body"] = orjson.loads(body) if body else None
        entries.append(entry)
    return entries


def all_redis_bytes(redis_url: str) -> bytes:
    """Every key and value in Redis (strings, hashes, sets, streams), concatenated."""
    client = client_for(redis_url)
    out = bytearray()
    try:
        for key in client.scan_iter(count=1000):
            out += key + b"\n"
            kind = client.type(key)
            if kind == b"string":
                out += client.get(key) or b""
            elif kind == b"hash":
                for k, v in client.hgetall(key).items():
                    out += k + b"=" + v + b"\n"
            elif kind == b"stream":
                for entry_id, fields in client.xrange(key):
                    out += entry_id + b"\n"
                    for k, v in fields.items():
                        out += k + b"=" + (entry_body(fields) if k == b"body" else v) + b"\n"
            elif kind == b"zset":
                out += b"\n".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
            elif kind == b"set":
                out += b"\n".join(client.smembers(key))
            elif kind == b"list":
                out += b"\n".join(client.lrange(key, 0, -1))
    finally:
        client.close()
    return bytes(out)


def sse_events(lines: list[str]) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comments and blank lines dropped)."""
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]
