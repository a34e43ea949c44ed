"""Errors answer in OpenAI's shape with the status the SDK maps to its exception classes,
never a 500 and never a traceback; after SSE has started, as an error event and [DONE]."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.capability import Keyring
from gateway.settings import ProviderSettings, ServerSettings, TimeoutSettings, load_settings
from tests.conftest import OPEN_PLAN, ROOT, Gateway, make_settings, start_gateway
from tests.openai_support import (
    assert_no_server_errors,
    bearer,
    journal,
    openai_error,
    sdk,
    sse_events,
)

HELLO = [{"role": "user", "content": "hello"}]
SMALL_PLAN = {
    "name": "small",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 16}],
    "budget": {"usd": 1},
}



@pytest.fixture
def token(gw: Gateway) -> str:
    return gw.token(OPEN_PLAN)


def _post(gw: Gateway, token: str, path: str, **kwargs: object) -> httpx.Response:
    headers = {**bearer(token), "Content-Type": "application/json"}
    return httpx.post(gw.openai_base + path, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


def test_malformed_json_is_400(gw: Gateway, token: str) -> None:
    response = _post(
        gw, token, "/chat/completions", content=b'{"model": "gpt-4o-mini", "messages": ['
    )
    error = openai_error(response, 400)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"


def test_json_that_is_not_an_object_is_400(gw: Gateway, token: str) -> None:
    openai_error(_post(gw, token, "/chat/completions", json=["model", "gpt-4o-mini"]), 400)


def test_unknown_request_field_is_400_naming_it(gw: Gateway, token: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gw, token).chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, extra_body={"frobnicate": True}
        )
    assert "frobnicate" in caught.value.message


def test_body_over_the_limit_is_413(redis_url: str, keyring: Keyring) -> None:
    gw = start_gateway(
        make_settings(server=ServerSettings(max_body_bytes=1024)), redis_url, keyring
    )
    try:
        token = gw.token(SMALL_PLAN)
        big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 2000}]}
        error = openai_error(_post(gw, token, "/chat/completions", json=big), 413)
        assert error["code"] == "payload_too_large"

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
            yield json.dumps(big).encode()

        openai_error(_post(gw, token, "/chat/completions", content=chunked()), 413)
        small = {"model": "gpt-4o-mini", "messages": HELLO}
        assert _post(gw, token, "/chat/completions", json=small).status_code == 200
        assert_no_server_errors(gw)
    finally:
        gw.close()


def test_unknown_model_is_404(gw: Gateway, token: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(gw, token).chat.completions.create(model="no-such-model", messages=HELLO)
    assert caught.value.code == "model_not_found"


def test_configured_model_outside_the_plan_is_403(gw: Gateway) -> None:
    client = sdk(gw, gw.token(SMALL_PLAN))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert "gpt-4o" in caught.value.message
    assert caught.value.code == "capability_denied"


def test_model_on_the_wrong_endpoint_is_400(gw: Gateway, token: str) -> None:
    with pytest.raises(openai.BadRequestError):
        sdk(gw, token).embeddings.create(model="gpt-4o-mini", input="x")


def test_upstream_error_is_502_without_a_traceback(gw: Gateway, token: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(gw, token).chat.completions.create(model="mock-error", messages=HELLO)
    assert caught.value.status_code == 502
    assert "Traceback" not in caught.value.response.text
    error = openai_error(caught.value.response, 502)
    assert error["type"] == "upstream_error"


def test_upstream_error_before_a_stream_starts_is_a_plain_502(gw: Gateway, token: str) -> None:
    body = {"model": "mock-error", "messages": HELLO, "stream": True}
    openai_error(_post(gw, token, "/chat/completions", json=body), 502)


def test_slow_upstream_past_the_provider_timeout_is_504(redis_url: str, keyring: Keyring) -> None:
    # The mock honours its provider's timeout_s: slower than it, it times out (see mock.py).
    base = load_settings(ROOT / "config" / "gateway.yaml")
    providers = [
        ProviderSettings(name="mock", kind="mock", timeouts=TimeoutSettings(first_byte_s=0.2)) if p.name == "mock" else p
        for p in base.providers
    ]
    gw = start_gateway(make_settings(providers=providers), redis_url, keyring)
    try:
        opened = gw.open_session(OPEN_PLAN)
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(gw, opened["token"]).chat.completions.create(model="mock-slow", messages=HELLO)
        assert caught.value.status_code == 504
        openai_error(caught.value.response, 504)
        streamed = _post(
            gw,
            opened["token"],
            "/chat/completions",
            json={"model": "mock-slow", "messages": HELLO, "stream": True},
        )
        assert openai_error(streamed, 504)["code"] == "upstream_timeout"
        errors = [e for e in journal(redis_url, opened["session_id"]) if e["kind"] == "error"]
        assert [e["status"] for e in errors] == ["504", "504"]
        assert gw.session(opened["session_id"])["reserved_nanos"] == 0
        assert_no_server_errors(gw)
    finally:
        gw.close()


def test_stream_cut_midway_ends_with_an_error_event_then_done(gw: Gateway, token: str) -> None:
    body = {"model": "mock-cut", "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST", gw.openai_base + "/chat/completions", json=body, headers=bearer(token), timeout=30
    ) as response:
        assert response.status_code == 200
        events = sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "upstream_error" and "Traceback" not in events[-2]
    chunks = [json.loads(e) for e in events[:-2]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_cut_midway_raises_in_the_sdk_after_some_chunks(gw: Gateway, token: str) -> None:
    stream = sdk(gw, token).chat.completions.create(model="mock-cut", messages=HELLO, stream=True)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert received


def test_unknown_route_is_404_json(gw: Gateway, token: str) -> None:
    response = httpx.get(gw.openai_base + "/no/such/route", headers=bearer(token))
    assert openai_error(response, 404)["code"] == "unknown_route"


def test_wrong_method_is_405_json(gw: Gateway, token: str) -> None:
    response = httpx.get(gw.openai_base + "/chat/completions", headers=bearer(token))
    openai_error(response, 405)


def _nested_metadata(depth: int, leaf: bytes) -> bytes:
    return (
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "metadata": '
        + b'{"a":' * depth
        + leaf
        + b"}" * depth
        + b"}"
    )


def test_an_override_nested_deep_in_metadata_is_found(gw: Gateway, token: str) -> None:
    raw = _nested_metadata(100, b'{"api_base": "http://evil"}')
    assert (
        openai_error(_post(gw, token, "/chat/completions", content=raw), 403)["code"]
        == "capability_denied"
    )


@pytest.mark.parametrize("depth", [300, 1000, 5000])
def test_bodies_nested_too_deep_are_400_not_500(gw: Gateway, token: str, depth: int) -> None:
    # orjson parses 1024 levels but serialises only 254; the journal re-serialises bodies.
    raw = _nested_metadata(depth, b'"x"')
    assert (
        openai_error(_post(gw, token, "/chat/completions", content=raw), 400)["code"]
        == "invalid_json"
    )


def test_errors_carry_the_callers_request_id(gw: Gateway, token: str) -> None:
    response = httpx.post(
        gw.openai_base + "/chat/completions",
        content=b"nope",
        headers={**bearer(token), "Content-Type": "application/json", "x-request-id": "my-req-1"},
    )
    openai_error(response, 400)
    assert response.headers["x-request-id"] == "my-req-1"
