"""The `openai` passthrough provider against a real HTTP fake upstream."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError, InvalidRequest, RateLimited, UpstreamError, UpstreamTimeout
from gateway.providers.base import Endpoint
from gateway.providers.openai_compat import (
    OpenAICompatProvider,
    SSEParser,
    make_upstream_client,
    scrub,
)
from gateway.providers.transport import Client
from gateway.settings import ProviderSettings
from tests.fakes.upstream import FakeUpstream

KEY = "sk-upstream-secret-0123456789abcdef"
KEY_ENV = "ABC_TEST_UPSTREAM_KEY"
MakeProvider = Callable[..., OpenAICompatProvider]
CHAT_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini-2024-07-18",
    "messages": [{"role": "user", "content": "hello there"}],
}


def chunk(text: str) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[Client]:
    s = make_upstream_client()
    yield s
    await s.close()


@pytest.fixture
def make_provider(session: Client, monkeypatch: pytest.MonkeyPatch) -> MakeProvider:
    monkeypatch.setenv(KEY_ENV, KEY)

    def make(api_base: str, **overrides: Any) -> OpenAICompatProvider:
        fields: dict[str, Any] = {
            "name": "local",
            "kind": "openai",
            "api_base": api_base,
            "api_key_env": KEY_ENV,
            **overrides,
        }
        return OpenAICompatProvider(ProviderSettings(**fields), session)

    return make


@pytest.fixture
def provider(upstream: FakeUpstream, make_provider: MakeProvider) -> OpenAICompatProvider:
    return make_provider(upstream.base_url)


async def collect(
    provider: OpenAICompatProvider, body: dict[str, Any] | None = None
) -> list[bytes]:
    return [p async for p in provider.stream(Endpoint.CHAT, body or {**CHAT_BODY, "stream": True})]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- where requests go, and with what ---------------------------------------------------------


async def test_upstream_key_goes_as_bearer_only_to_api_base(
    upstream: FakeUpstream, make_provider: MakeProvider
) -> None:
    async with FakeUpstream() as elsewhere:
        provider = make_provider(upstream.base_url + "/")  # a trailing slash is tolerated
        body = {
            **CHAT_BODY,
            # A body naming another upstream or key must change nothing.
            "api_base": elsewhere.base_url,
            "base_url": elsewhere.base_url,
            "api_key": "sk-client-supplied-key-000000",
        }
        await provider.send(Endpoint.CHAT, body)
        assert elsewhere.requests == []
    [req] = upstream.requests
    assert req.method == "POST"
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == "abc-gateway"
    assert req.json == body  # passthrough: stripping override fields is the PEP's job


async def test_each_endpoint_has_its_own_path(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    await provider.send(Endpoint.COMPLETIONS, {"model": "m", "prompt": "hi"})
    reply = await provider.send(Endpoint.EMBEDDINGS, {"model": "m", "input": ["a", "b"]})
    assert [r.path for r in upstream.requests] == ["/v1/completions", "/v1/embeddings"]
    assert len(reply.data["data"]) == 2


async def test_no_authorization_header_without_a_configured_key(
    upstream: FakeUpstream, make_provider: MakeProvider
) -> None:
    provider = make_provider(upstream.base_url, api_key_env=None)
    await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert "Authorization" not in upstream.last_request.headers


async def test_request_id_is_forwarded_only_when_it_is_a_plain_token(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    await provider.send(Endpoint.CHAT, CHAT_BODY, request_id="req_abc-123")
    await provider.send(Endpoint.CHAT, CHAT_BODY, request_id="bad id; x=1")
    await provider.send(Endpoint.CHAT, CHAT_BODY, request_id="req_abc\nX-Injected: 1")
    await provider.send(Endpoint.CHAT, CHAT_BODY, request_id="req_abc\n")
    first, *others = upstream.requests
    assert first.headers["X-Request-Id"] == "req_abc-123"
    for request in others:
        assert "X-Request-Id" not in request.headers
        assert "X-Injected" not in request.headers


async def test_redirects_are_not_followed(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    async with FakeUpstream() as elsewhere:
        target = elsewhere.base_url + "/chat/completions"
        upstream.respond_with(status=307, json={}, headers={"Location": target})
        with pytest.raises(UpstreamError):
            await provider.send(Endpoint.CHAT, CHAT_BODY)
        assert elsewhere.requests == []


# --- non-streaming answers ------------------------------------------------------------------


async def test_send_returns_the_upstream_bytes_and_their_parse(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    answer = {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3}}
    upstream.respond_with(body=orjson.dumps(answer) + b"\n")
    reply = await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert reply.body == orjson.dumps(answer) + b"\n"
    assert reply.data == answer


async def test_default_fake_answer_echoes_with_usage(provider: OpenAICompatProvider) -> None:
    reply = await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert reply.data["choices"][0]["message"]["content"] == "echo: hello there"
    assert reply.data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_only_allow_listed_headers_pass_through(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.respond_with(
        json={"ok": True},
        headers={
            "openai-version": "2020-10-01",
            "openai-processing-ms": "12",
            "x-ratelimit-remaining-tokens": "999",
            "x-request-id": "req_upstream_1",
            "set-cookie": "session=abc",
            "openai-organization": "org-secret",
            "x-internal-debug": "yes",
        },
    )
    reply = await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert reply.headers == {
        "openai-version": "2020-10-01",
        "openai-processing-ms": "12",
        "x-ratelimit-remaining-tokens": "999",
        "x-upstream-request-id": "req_upstream_1",
    }


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]"])
async def test_a_200_that_is_not_a_json_object_is_502(
    upstream: FakeUpstream, provider: OpenAICompatProvider, body: bytes
) -> None:
    upstream.respond_with(body=body)
    with pytest.raises(UpstreamError) as info:
        await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert info.value.status == 502


async def test_keep_alive_connection_is_reused(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    await collect(provider)
    await provider.send(Endpoint.CHAT, CHAT_BODY)
    await collect(provider)
    peers = {r.peer for r in upstream.requests}
    assert len(peers) == 1


async def test_connection_is_reused_when_the_body_ends_just_after_done(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    # The empty last chunk delays the end of the chunked body past [DONE].
    upstream.stream_with([chunk("a"), "data: [DONE]\n\n", ""], include_done=False, delay_s=0.03)
    assert await collect(provider) == [orjson.dumps(chunk("a"))]
    await provider.send(Endpoint.CHAT, CHAT_BODY)
    first, second = upstream.requests
    assert first.peer == second.peer


# --- status mapping -------------------------------------------------------------------------


def upstream_error(message: str, *, param: str | None = None, code: str | None = None) -> Any:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
async def test_client_fault_statuses_pass_through_with_message_param_and_code(
    upstream: FakeUpstream, provider: OpenAICompatProvider, status: int
) -> None:
    upstream.respond_with(
        status=status,
        json=upstream_error("max_tokens is too large", param="max_tokens", code="too_big"),
    )
    with pytest.raises(InvalidRequest) as info:
        await provider.send(Endpoint.CHAT, CHAT_BODY)
    err = info.value
    assert (err.status, err.message, err.param, err.code) == (
        status,
        "max_tokens is too large",
        "max_tokens",
        "too_big",
    )
    assert err.to_dict()["error"]["type"] == "invalid_request_error"


async def test_client_fault_without_a_json_body_gets_a_generic_message(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.respond_with(status=400, body=b"<html>bad</html>")
    with pytest.raises(InvalidRequest) as info:
        await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert info.value.message == "upstream rejected the request"
    assert info.value.code == "invalid_request"


async def test_flat_vllm_style_error_body_is_understood(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    flat = {"object": "error", "message": "context too long", "type": "BadRequest", "code": 400}
    upstream.respond_with(status=400, json=flat)
    with pytest.raises(InvalidRequest) as info:
        await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert info.value.message == "context too long"


@pytest.mark.parametrize(
    ("status", "error_type", "expected_status", "expected_code"),
    [
        (401, UpstreamError, 502, "upstream_auth_failed"),
        (403, UpstreamError, 502, "upstream_auth_failed"),
        (429, RateLimited, 429, "upstream_rate_limited"),
        (500, UpstreamError, 502, "upstream_error"),
        (503, UpstreamError, 502, "upstream_error"),
        (418, UpstreamError, 502, "upstream_error"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_other_statuses_map_to_gateway_errors(
    upstream: FakeUpstream,
    provider: OpenAICompatProvider,
    status: int,
    error_type: type[GatewayError],
    expected_status: int,
    expected_code: str,
    streaming: bool,
) -> None:
    upstream.respond_with(status=status, json=upstream_error(f"upstream says {KEY}"))
    with pytest.raises(error_type) as info:
        if streaming:
            await collect(provider)
        else:
            await provider.send(Endpoint.CHAT, CHAT_BODY)
    err = info.value
    assert (err.status, err.code) == (expected_status, expected_code)
    assert "upstream says" not in err.message  # these statuses never pass upstream text on
    if status == 429:
        assert err.to_dict()["error"]["type"] == "rate_limit_error"
    if status >= 500:
        assert err.message == f"upstream error (status {status})"


async def test_stream_error_status_is_raised_before_anything_is_yielded(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.respond_with(status=400, json=upstream_error("bad tools", param="tools"))
    stream = provider.stream(Endpoint.CHAT, {**CHAT_BODY, "stream": True})
    with pytest.raises(InvalidRequest) as info:
        await anext(stream)
    assert (info.value.message, info.value.param) == ("bad tools", "tools")


# --- transport failures ---------------------------------------------------------------------


async def test_slow_upstream_is_a_504(upstream: FakeUpstream, make_provider: MakeProvider) -> None:
    provider = make_provider(upstream.base_url, timeouts={"first_byte_s": 0.2, "idle_s": 0.2})
    upstream.respond_with(json={}, delay_s=2.0)
    with pytest.raises(UpstreamTimeout) as info:
        await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert info.value.status == 504


async def test_stream_stalling_between_chunks_is_a_504(
    upstream: FakeUpstream, make_provider: MakeProvider
) -> None:
    provider = make_provider(upstream.base_url, timeouts={"first_byte_s": 0.2, "idle_s": 0.2})
    upstream.stream_with([chunk("a"), chunk("b")], delay_s=1.0)
    with pytest.raises(UpstreamTimeout):
        await collect(provider)


async def test_connection_refused_is_502_without_the_address(make_provider: MakeProvider) -> None:
    port = free_port()
    provider = make_provider(f"http://127.0.0.1:{port}/v1")
    for call in (provider.send(Endpoint.CHAT, CHAT_BODY), collect(provider)):
        with pytest.raises(UpstreamError) as info:
            await call
        assert info.value.message == "upstream unreachable"
        assert str(port) not in info.value.to_json().decode()


# --- streaming ------------------------------------------------------------------------------


async def test_stream_yields_every_payload_in_order_and_stops_at_done(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    chunks = [chunk(str(i)) for i in range(20)]
    # Anything after [DONE] is not part of the answer.
    upstream.stream_with([*chunks, "data: [DONE]\n\n", chunk("late")], include_done=False)
    payloads = await collect(provider)
    assert payloads == [orjson.dumps(c) for c in chunks]
    req = upstream.last_request
    assert req.headers["Accept"] == "text/event-stream"
    assert req.headers["Authorization"] == f"Bearer {KEY}"


async def test_default_fake_stream_carries_usage_when_asked(provider: OpenAICompatProvider) -> None:
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    payloads = [orjson.loads(p) for p in await collect(provider, body)]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"])
    assert text == "echo: hello there"
    assert payloads[-1]["usage"]["completion_tokens"] == 3


async def test_multi_line_events_comments_and_other_fields(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.stream_with(
        [
            ": keep-alive\n\n",
            'event: message\nid: 7\nretry: 10\ndata: {"a":\ndata: 1}\n\n',
            'data:{"b":2}\r\n\r\n',
            "data:  [DONE]\n\n",  # two spaces: not the sentinel, a payload " [DONE]"
            "data: [DONE]",  # the last event may lack its blank line
        ],
        include_done=False,
    )
    assert await collect(provider) == [b'{"a":\n1}', b'{"b":2}', b" [DONE]"]


async def test_a_megabyte_event_streams_through(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    big = chunk("x" * 1_000_000)
    upstream.stream_with([big, chunk("after")])
    assert await collect(provider) == [orjson.dumps(big), orjson.dumps(chunk("after"))]


async def test_error_event_mid_stream_raises_after_earlier_payloads(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.stream_with(
        [chunk("a"), {"error": {"message": "model overloaded", "type": "server_error"}}, chunk("b")]
    )
    seen: list[bytes] = []
    with pytest.raises(UpstreamError) as info:
        async for payload in provider.stream(Endpoint.CHAT, {**CHAT_BODY, "stream": True}):
            seen.append(payload)
    assert seen == [orjson.dumps(chunk("a"))]
    assert info.value.message == "model overloaded"


async def test_content_mentioning_error_is_not_an_error_event(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.stream_with([chunk("error"), {"choices": [], "x": {"error": 1}}])
    assert len(await collect(provider)) == 2


async def test_connection_dropped_mid_stream_is_502(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.stream_with([chunk(str(i)) for i in range(5)], drop_after=2)
    seen: list[bytes] = []
    with pytest.raises(UpstreamError) as info:
        async for payload in provider.stream(Endpoint.CHAT, {**CHAT_BODY, "stream": True}):
            seen.append(payload)
    assert len(seen) == 2
    assert info.value.message == "upstream stream ended early"


async def test_stream_ending_without_done_is_502(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.stream_with([chunk("a"), 'data: {"trunc'], include_done=False)
    with pytest.raises(UpstreamError, match="ended early"):
        await collect(provider)


async def test_closing_the_stream_early_disconnects_the_upstream(
    upstream: FakeUpstream, provider: OpenAICompatProvider
) -> None:
    upstream.stream_with([chunk(str(i)) for i in range(100)], delay_s=0.02)
    stream = provider.stream(Endpoint.CHAT, {**CHAT_BODY, "stream": True})
    assert await anext(stream) == orjson.dumps(chunk("0"))
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert await upstream.wait_disconnect()
    assert upstream.streams_completed == 0
    # The half-read connection was closed, not handed back to the pool.
    await provider.send(Endpoint.CHAT, CHAT_BODY)
    first, second = upstream.requests
    assert first.peer != second.peer


# --- keys never leak ------------------------------------------------------------------------


async def test_echoed_key_and_url_never_reach_the_error_or_the_logs(
    upstream: FakeUpstream,
    provider: OpenAICompatProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"Incorrect API key provided: {KEY} (Authorization: Bearer {KEY}) at {upstream.base_url}"
    upstream.respond_with(status=400, json=upstream_error(echo, param=KEY, code=KEY))
    upstream.stream_with([chunk("a"), {"error": {"message": echo}}])
    errors: list[GatewayError] = []
    for call in (provider.send(Endpoint.CHAT, CHAT_BODY), collect(provider)):
        with pytest.raises(GatewayError) as info:
            await call
        errors.append(info.value)
    for err in errors:
        rendered = err.message + err.to_json().decode() + str(err) + repr(err)
        assert KEY not in rendered
        assert upstream.base_url not in rendered
        assert "Incorrect API key provided: ***" in err.message
    assert KEY not in caplog.text
    assert all(KEY not in r.getMessage() for r in caplog.records)


def test_scrub_removes_secrets_and_key_shaped_strings() -> None:
    text = "key sk-proj-abcdefgh1234 and Bearer eyJhbGciOi.x.y and mysecret at http://up:9/v1/x"
    assert scrub(text, ["mysecret", "http://up:9/v1", None, ""]) == (
        "key *** and Bearer *** and *** at ***/x"
    )


def test_scrub_ignores_too_short_secrets_and_keeps_plain_text() -> None:
    assert scrub("an ordinary message", ["x", "an"]) == "an ordinary message"
    assert scrub("sk-short stays", []) == "sk-short stays"


# --- the SSE parser on its own --------------------------------------------------------------


def test_sse_parser_is_indifferent_to_how_bytes_are_split() -> None:
    raw = b': hi\r\n\r\ndata: {"a":1}\r\n\r\nevent: x\ndata: l1\ndata: l2\n\ndata:[DONE]\n\n'
    whole = SSEParser().feed(raw)
    parser = SSEParser()
    bytewise = [p for i in range(len(raw)) for p in parser.feed(raw[i : i + 1])]
    assert whole == bytewise == [b'{"a":1}', b"l1\nl2", b"[DONE]"]


SSE_PIECES = [
    b'data: {"a":1}\n\n', b": keep-alive\n\n", b"event: x\ndata: l1\ndata: l2\n\n", b"data:[DONE]\n\n",
    b"\n", b"data: \n\n", b"data: x\r\n\r\n", b"id: 3\n", b"data: y\n", b"\n\n", b"data:  z\n\n",
    b"retry: 1\n\n", b"data: tail",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SSE_PIECES), min_size=1, max_size=12), st.lists(st.integers(1, 200), max_size=6))
def test_sse_parser_gives_the_same_events_however_the_stream_is_cut(pieces: list[bytes], cuts: list[int]) -> None:
    raw = b"".join(pieces)

    def events(splits: list[bytes]) -> list[bytes]:
        parser = SSEParser()
        found = [p for piece in splits for p in parser.feed(piece)]
        last = parser.finish()
        return found + ([last] if last is not None else [])

    bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    cut = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    bytewise = [raw[i : i + 1] for i in range(len(raw))]
    assert events([raw]) == events(cut) == events(bytewise)


def test_sse_parser_refuses_an_endless_line() -> None:
    parser = SSEParser()
    with pytest.raises(UpstreamError, match="oversized"):
        for _ in range(10):
            parser.feed(b"x" * 1_000_000)


async def test_upstream_client_ignores_environment_proxies_and_keeps_no_cookies(
    upstream: FakeUpstream, provider: OpenAICompatProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeUpstream() as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy.base_url)
        upstream.respond_with(json={"ok": True}, headers={"Set-Cookie": "session=abc; Path=/"})
        await provider.send(Endpoint.CHAT, CHAT_BODY)
        await provider.send(Endpoint.CHAT, CHAT_BODY)
        assert proxy.requests == []
    assert len(upstream.requests) == 2
    assert "Cookie" not in upstream.requests[1].headers
