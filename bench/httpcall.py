"""Blocking one-off HTTP calls for the harness: readiness polls, the admin API, preflights.

Not used for load: that is wrk's job.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson


def call(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def call_json(
    method: str,
    url: str,
    payload: object | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON or the raw text when the body is not JSON)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    body = orjson.dumps(payload) if payload is not None else None
    status, raw = call(method, url, body=body, headers=all_headers)
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, raw.decode(errors="replace")


def wait_for_200(
    url: str, *, started: float, timeout_s: float, still_running: Callable[[], bool]
) -> float:
    """Seconds from `started` (a time.monotonic() value) to the first 200 from url."""
    deadline = started + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not still_running():
            raise RuntimeError(f"process exited before {url} answered 200 (last: {last})")
        try:
            status, _ = call("GET", url, timeout_s=1.0)
            if status == 200:
                return time.monotonic() - started
            last = f"status {status}"
        except OSError as exc:
            last = type(exc).__name__
        # A short poll: start-up is one of the figures, and 5 ms is within its noise.
        time.sleep(0.005)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f}s (last: {last})")
