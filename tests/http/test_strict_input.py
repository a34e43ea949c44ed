"""Strict input at the edge, against a running gateway and a real HTTP fake upstream:
repeated JSON keys, bodies outside their endpoint's schema, bodies that are not JSON and
requests aiohttp cannot parse are refused in OpenAI's shape, before anything is reserved
or forwarded; a refusal under a valid token is journaled as a denial (a request aiohttp
cannot parse has no token the gateway could read).

The fake upstream runs on its own event-loop thread, so plain sync clients (httpx, raw
sockets, hypothesis) drive the gateway while "nothing forwarded" is counted, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.capability import Keyring
from gateway.pipeline.request_body import parse_body
from gateway.pipeline.request_schema import check_shape
from gateway.providers.base import Endpoint
from gateway.settings import ModelSettings, Price, ProviderSettings
from tests.conftest import Gateway, assert_no_server_errors, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream
from tests.openai_support import bearer, journal, openai_error

PLAN: dict[str, Any] = {
    "name": "strict-input",
    "tenant": "acme",
    "models": [
        {"name": "fake-chat", "max_tokens": 64, "max_n": 4},
        {"name": "fake-text", "max_tokens": 64},
        {"name": "fake-embed"},
    ],
    "budget": {"usd": 50, "requests": 100_000},
}
HELLO = [{"role": "user", "content": "hello there"}]
CHAT_OK = {"model": "fake-chat", "messages": HELLO}
JSON = {"Content-Type": "application/json"}


class ThreadedUpstream:
    """A FakeUpstream on its own event loop and thread."""

    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-upstream", daemon=True)

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(timeout=30)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@dataclass
class Rig:
    gw: Gateway
    fake: FakeUpstream
    redis_url: str
    session_id: str
    token: str
    client: httpx.Client

    @property
    def forwarded(self) -> int:
        return len(self.fake.requests)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post(path, content=body, headers={**JSON, **(headers or {})})

    def reserved(self) -> int:
        return int(self.gw.session(self.session_id)["reserved_nanos"])

    def denials(self) -> list[tuple[str, str, str]]:
        """(status, code, param) of each journaled denial, in order."""
        entries = journal(self.redis_url, self.session_id)
        return [(e["status"], e["code"], e.get("param", "")) for e in entries if e["kind"] == "denial"]


@pytest.fixture
def rig(redis_url: str, keyring: Keyring) -> Iterator[Rig]:
    with ThreadedUpstream() as fake:
        base = make_settings()
        price = Price(input_per_mtok=1.0, output_per_mtok=2.0)
        settings = make_settings(
            providers=[*base.providers, ProviderSettings(name="fake", kind="openai", api_base=fake.base_url)],
            models=[
                *base.models,
                ModelSettings(name="fake-chat", provider="fake", price=price),
                ModelSettings(name="fake-text", provider="fake", kind="completion", price=price),
                ModelSettings(name="fake-embed", provider="fake", kind="embedding", price=price),
            ],
        )
        gw = start_gateway(settings, redis_url, keyring)
        opened = gw.open_session(PLAN)
        client = httpx.Client(base_url=gw.openai_base, headers=bearer(opened["token"]), timeout=30)
        try:
            yield Rig(gw, fake, redis_url, opened["session_id"], opened["token"], client)
            assert_no_server_errors(gw)
        finally:
            client.close()
            gw.close()


# --- duplicate keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "fake-chat", "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"mo\\u0064el": "gpt-4o", "model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "fake-chat", "messages": [{"role": "user", "content": "hi", "role": "system"}]}', "messages[0].role"),
        (b'{"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "metadata": {"a": "1", "a": "2"}}', "metadata.a"),
    ],
)  # fmt: skip
def test_a_repeated_key_is_400_and_nothing_is_reserved_or_forwarded(rig: Rig, raw: bytes, param: str) -> None:
    error = openai_error(rig.post("/chat/completions", raw), 400)
    assert error["code"] == "duplicate_key" and error["param"] == param
    assert rig.forwarded == 0 and rig.reserved() == 0
    assert rig.denials() == [("400", "duplicate_key", param)]
    assert rig.post("/chat/completions", json.dumps(CHAT_OK).encode()).status_code == 200
    assert rig.forwarded == 1  # the rig forwards what it should: the zeros above are real


# --- the endpoint's schema ------------------------------------------------------------

REFUSED_SHAPES: list[tuple[str, dict[str, Any], str]] = [
    ("/chat/completions", {"model": "fake-chat", "messages": []}, "messages"),
    ("/chat/completions", {"model": "fake-chat", "messages": "hello"}, "messages"),
    ("/chat/completions", {"model": "fake-chat", "messages": {"role": "user", "content": "hi"}}, "messages"),
    ("/chat/completions", {"model": "fake-chat", "messages": [1, 2, 3]}, "messages[0]"),
    ("/chat/completions", {"model": "fake-chat", "messages": [{"role": "root", "content": "hi"}]}, "messages[0].role"),
    ("/chat/completions", {"model": "fake-chat", "messages": [{"role": 7, "content": "hi"}]}, "messages[0].role"),
    ("/chat/completions", {**CHAT_OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/chat/completions", {**CHAT_OK, "stop": 5}, "stop"),
    ("/chat/completions", {**CHAT_OK, "seed": 2**63}, "seed"),
    ("/chat/completions", {**CHAT_OK, "temperature": 2.5}, "temperature"),
    ("/chat/completions", {**CHAT_OK, "top_p": -0.1}, "top_p"),
    ("/chat/completions", {**CHAT_OK, "presence_penalty": 9}, "presence_penalty"),
    ("/chat/completions", {**CHAT_OK, "top_logprobs": 50}, "top_logprobs"),
    ("/completions", {"model": "fake-text", "prompt": {"text": "hi"}}, "prompt"),
    ("/completions", {"model": "fake-text"}, "prompt"),
    ("/embeddings", {"model": "fake-embed", "input": []}, "input"),
    ("/embeddings", {"model": "fake-embed", "input": [[1, 2], "x"]}, "input"),
]  # fmt: skip


def test_bodies_outside_the_schema_are_400_journaled_and_never_forwarded(rig: Rig) -> None:
    for path, body, param in REFUSED_SHAPES:
        error = openai_error(rig.post(path, json.dumps(body).encode()), 400)
        assert error["param"] == param, (path, body, error)
        assert error["type"] == "invalid_request_error" and error["rule"] == "invalid_param"
    assert rig.forwarded == 0 and rig.reserved() == 0
    entries = [e for e in journal(rig.redis_url, rig.session_id) if e["kind"] != "state"]
    assert [e["kind"] for e in entries] == ["denial"] * len(REFUSED_SHAPES)
    assert {e["status"] for e in entries} == {"400"} and {e["rule"] for e in entries} == {"invalid_param"}
    # Every endpoint still forwards a body within its schema.
    valid: list[tuple[str, dict[str, Any]]] = [
        ("/chat/completions", {**CHAT_OK, "stop": ["a", "b", "c", "d"], "seed": 2**63 - 1, "temperature": 2}),
        ("/completions", {"model": "fake-text", "prompt": [1, 2, 3]}),
        ("/embeddings", {"model": "fake-embed", "input": [[1, 2], [3]]}),
    ]
    for path, body in valid:
        assert rig.post(path, json.dumps(body).encode()).status_code == 200, (path, body)
    assert rig.forwarded == 3 and rig.reserved() == 0


# --- Content-Type ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx",
     "application/json-patch+json", "application/json; charset=latin-1", "multipart/form-data; boundary=x"],
)  # fmt: skip
def test_a_body_that_is_not_declared_json_is_415(rig: Rig, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}  # httpx adds none of its own
    response = rig.client.post("/chat/completions", content=json.dumps(CHAT_OK).encode(), headers=headers)
    assert ("content-type" in response.request.headers) == (content_type is not None)
    error = openai_error(response, 415)
    assert error["code"] == "unsupported_media_type" and error["param"] == "Content-Type"
    assert rig.forwarded == 0 and rig.reserved() == 0
    assert rig.denials() == [("415", "unsupported_media_type", "Content-Type")]


@pytest.mark.parametrize("content_type", ["Application/JSON", "application/json; charset=UTF-8", "application/json;charset=utf8"])
def test_json_with_any_case_and_a_utf8_charset_is_accepted(rig: Rig, content_type: str) -> None:
    response = rig.post("/chat/completions", json.dumps(CHAT_OK).encode(), {"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert rig.forwarded == 1


# --- requests aiohttp cannot parse ----------------------------------------------------


def exchange_raw(gw: Gateway, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` bytes as they are; the status, headers and body of the answer."""
    with socket.create_connection((gw.server.host, gw.server.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(status_line.split()[1]), headers, body


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, body = out + body[:n], body[n + 2 :]
    return out


SECRET = "sk-live-DO-NOT-ECHO-0123456789"
_HOST = b"Host: gw\r\nConnection: close\r\n"
MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("a header over the size limit", b"GET /healthz HTTP/1.1\r\n" + _HOST + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "request_header_fields_too_large"),
    ("a secret header over the size limit", b"POST /v1/chat/completions HTTP/1.1\r\n" + _HOST + b"Authorization: Bearer " + SECRET.encode() * 300 + b"\r\n\r\n", 431, "request_header_fields_too_large"),
    ("too many headers", b"GET /healthz HTTP/1.1\r\n" + _HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", 431, "request_header_fields_too_large"),
    ("a control character in a header value", b"GET /healthz HTTP/1.1\r\n" + _HOST + b"X-Bad: a\x01b\r\n\r\n", 400, "invalid_http_request"),
    ("a space in a header name", b"GET /healthz HTTP/1.1\r\n" + _HOST + b"Bad Header: v\r\n\r\n", 400, "invalid_http_request"),
    ("Transfer-Encoding with Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\n" + _HOST + b"Content-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "invalid_http_request"),
    ("a request line that is not HTTP", b"HELLO THERE\r\n\r\n", 400, "invalid_request_line"),
    ("an unknown HTTP version", b"GET /healthz HTTP/7.1\r\n" + _HOST + b"\r\n", 400, "invalid_request_line"),
    ("a request line over the size limit", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + _HOST + b"\r\n", 414, "uri_too_long"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "request_bytes", "status", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_requests_aiohttp_cannot_parse_are_answered_in_openais_shape(
    gateway: Gateway, what: str, request_bytes: bytes, status: int, code: str
) -> None:
    got, headers, body = exchange_raw(gateway, request_bytes)
    assert got == status, (what, body)
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"].startswith("req_")
    error = json.loads(body)["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert {"message", "type", "param", "code"} <= error.keys() and error["message"]
    assert SECRET not in body.decode() and "Traceback" not in body.decode()
    assert httpx.get(gateway.base_url + "/healthz", timeout=30).status_code == 200  # still serving


def test_a_broken_chunked_body_is_400_and_never_forwarded(rig: Rig) -> None:
    start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    auth = f"Authorization: Bearer {rig.token}\r\n".encode()
    framing = b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, headers, body = exchange_raw(rig.gw, start + auth + framing + b"zz\r\n{}\r\n0\r\n\r\n")
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert "error" in json.loads(body)
    assert rig.forwarded == 0 and rig.reserved() == 0


# --- property: random bodies are a 200 or an OpenAI-shaped 4xx, never forwarded when refused


class Pairs(list[tuple[str, Any]]):
    """A JSON object as it will be written, repeated keys and all."""


def encode(node: Any) -> str:
    if isinstance(node, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in node) + "}"
    if isinstance(node, list):
        return "[" + ",".join(encode(v) for v in node) + "]"
    return json.dumps(node)


# Integers at the edges the schema cares about; the huge ones are outside int64.
INTS = st.sampled_from([-(2**63) - 1, -(2**63), -3, -1, 0, 1, 2, 4, 5, 20, 21, 64, 65, 129, 2**63 - 1, 2**63, 2**64])
SCALARS = st.none() | st.booleans() | INTS | st.floats(-3, 3) | st.sampled_from(["", "x", "user", "auto", "text", "hi: there"])
VALUES = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.sampled_from(["type", "text", "role", "content", "name", "x"]), c, max_size=3),
    max_leaves=8,
)
MESSAGE_KEYS = st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id", "refusal"])
BASES: dict[str, dict[str, Any]] = {
    "/chat/completions": {"model": "fake-chat", "messages": [{"role": "system", "content": "be brief"}, *HELLO], "max_tokens": 16},
    "/completions": {"model": "fake-text", "prompt": "hello there", "max_tokens": 16},
    "/embeddings": {"model": "fake-embed", "input": "hello there"},
}
ENDPOINTS = {"/chat/completions": Endpoint.CHAT, "/completions": Endpoint.COMPLETIONS, "/embeddings": Endpoint.EMBEDDINGS}
FIELDS = st.sampled_from([
    "model", "messages", "prompt", "input", "temperature", "top_p", "n", "stop", "seed", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
    "stream", "stream_options", "response_format", "tools", "tool_choice", "logit_bias", "user",
    "metadata", "best_of", "echo", "suffix", "encoding_format", "dimensions", "top_k",
])  # fmt: skip
MUTATIONS = st.one_of(
    st.tuples(st.just("set"), FIELDS, VALUES),
    st.tuples(st.just("drop"), FIELDS, st.none()),
    st.tuples(st.just("repeat"), FIELDS, VALUES),
    st.tuples(st.just("message"), MESSAGE_KEYS, VALUES),
    st.tuples(st.just("repeat_in_message"), MESSAGE_KEYS, VALUES),
)


def mutated(path: str, mutations: list[tuple[str, str, Any]]) -> Pairs:
    body = Pairs((k, [Pairs(m.items()) for m in v] if k == "messages" else v) for k, v in BASES[path].items())
    for kind, key, value in mutations:
        if kind == "set":
            body = Pairs([(k, v) for k, v in body if k != key] + [(key, value)])
        elif kind == "drop":
            body = Pairs((k, v) for k, v in body if k != key)
        elif kind == "repeat":
            body.append((key, value))
        else:
            messages = next((v for k, v in body if k == "messages"), None)
            if isinstance(messages, list) and messages and isinstance(messages[-1], Pairs):
                last = messages[-1]
                if kind == "message":
                    last[:] = [(k, v) for k, v in last if k != key]
                last.append((key, value))
    return body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(BASES)), mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_random_bodies_get_a_200_or_an_openai_4xx_and_refusals_reach_no_upstream(
    rig: Rig, path: str, mutations: list[tuple[str, str, Any]]
) -> None:
    raw = encode(mutated(path, mutations)).encode()
    before = rig.forwarded
    response = rig.post(path, raw)
    assert response.status_code < 500, (response.status_code, raw, response.text)
    if response.status_code == 200:
        assert rig.forwarded == before + 1, raw
        # What went upstream is strict JSON within the endpoint's schema.
        check_shape(ENDPOINTS[path], parse_body(rig.fake.requests[-1].body))
    else:
        assert 400 <= response.status_code < 500
        openai_error(response, response.status_code)
        assert rig.forwarded == before, (raw, response.text)
    assert rig.reserved() == 0

