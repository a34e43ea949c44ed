"""Any single-byte change to a VCS token, sent over real HTTP, is a 401 before anything else."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import OPEN_PLAN, Gateway

# Bytes a header value can carry (no CR, LF or NUL), Latin-1 included; http.client sends
# them as given, where stricter clients refuse some (a trailing tab, say).
HEADER_BYTES = st.integers(0x20, 0xFF).filter(lambda b: b != 0x7F) | st.just(0x09)
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def token(gw: Gateway) -> str:
    return gw.token(OPEN_PLAN)  # fixtures run once for all of a test's examples


@pytest.fixture
def conn(gw: Gateway) -> Iterator[http.client.HTTPConnection]:
    url = urlsplit(gw.base_url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    yield connection
    connection.close()


def post(conn: http.client.HTTPConnection, authorization: bytes) -> tuple[int, dict[str, str]]:
    conn.request("POST", "/v1/chat/completions", body=BODY,
                 headers={"Authorization": authorization, "Content-Type": "application/json"})
    response = conn.getresponse()
    error: dict[str, str] = json.loads(response.read()).get("error", {})
    return response.status, error


def test_the_untouched_token_is_accepted(conn: http.client.HTTPConnection, token: str) -> None:
    assert post(conn, b"Bearer " + token.encode())[0] == 200


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_to_a_token_is_a_401(conn: http.client.HTTPConnection, token: str, data: st.DataObject) -> None:
    raw = bytearray(token.encode())
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[index] = data.draw(HEADER_BYTES.filter(lambda b: b != raw[index]), label="byte")
    status, error = post(conn, b"Bearer " + bytes(raw))
    assert status == 401, (bytes(raw), error)
    assert error["type"] == "authentication_error"
