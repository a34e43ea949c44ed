"""The `openai` passthrough provider through a running gateway, against a real HTTP fake
upstream: what the upstream receives, what comes back, and that secrets stay behind.

The fake upstream runs on the test's event loop and the gateway on its own thread, so every
call that reaches the upstream is made with the async SDK or httpx.AsyncClient.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from gateway.capability import Keyring
from gateway.settings import ModelSettings, Price, ProviderSettings, load_settings
from tests.conftest import ROOT, Gateway, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream
from tests.openai_support import (
    all_redis_bytes,
    assert_no_server_errors,
    async_sdk,
    bearer,
    journal,
    openai_error,
    sse_events,
)

UPSTREAM_KEY = "sk-test-SECRET123456"
HELLO = [{"role": "user", "content": "hello there"}]


def _tool(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"{name} tool",
        "parameters": {"type": "object", "properties": {"id": {"type": "string"}}},
    }


def _offered(name: str) -> dict[str, Any]:
    return {"type": "function", "function": _tool(name)}


UP_PLAN: dict[str, Any] = {
    "name": "passthrough",
    "tenant": "acme",
    "models": [
        {"name": "up-model", "max_tokens": 100},
        {"name": "up-embed"},
    ],
    "tools": [_tool("lookup_order"), _tool("cancel_order")],
    "budget": {"usd": 5},
}


@dataclass
class Upstreamed:
    fake: FakeUpstream
    gw: Gateway
    redis_url: str

    def session(self, plan: dict[str, Any] = UP_PLAN) -> tuple[str, openai.AsyncOpenAI]:
        opened = self.gw.open_session(plan)
        return opened["session_id"], async_sdk(self.gw, opened["token"])


@pytest.fixture
async def up(
    redis_url: str, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Upstreamed]:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    # With api_key set the fake answers 401 to any other bearer, like OpenAI.
    async with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        base = load_settings(ROOT / "config" / "gateway.yaml")
        price = Price(input_per_mtok=1.0, output_per_mtok=2.0)
        settings = make_settings(
            providers=[
                *base.providers,
                ProviderSettings(
                    name="up",
                    kind="openai",
                    api_base=fake.base_url,
                    api_key_env="TEST_UPSTREAM_KEY",
                ),
            ],
            models=[
                *base.models,
                ModelSettings(
                    name="up-model", provider="up", upstream_model="real-up-model", price=price
                ),
                ModelSettings(
                    name="up-embed",
                    provider="up",
                    upstream_model="real-up-embed",
                    kind="embedding",
                    price=price,
                ),
            ],
        )
        gw = start_gateway(settings, redis_url, keyring)
        try:
            yield Upstreamed(fake, gw, redis_url)
            assert_no_server_errors(gw)
        finally:
            gw.close()


def _completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "real-up-model",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def _tool_call_message(name: str) -> dict[str, Any]:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": name, "arguments": '{"id": "7"}'},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "real-up-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _upstream_error(message: str, code: str = "bad") -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": "messages",
            "code": code,
        }
    }


async def _raw_stream(gw: Gateway, token: str, body: dict[str, Any]) -> tuple[int, list[str]]:
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST", gw.openai_base + "/chat/completions", json=body, headers=bearer(token)
        ) as response:
            return response.status_code, sse_events([line async for line in response.aiter_lines()])


# --- what the upstream receives -------------------------------------------------------------


async def test_upstream_gets_the_configured_key_and_pinned_model_never_the_vcs_token(
    up: Upstreamed,
) -> None:
    opened = up.gw.open_session(UP_PLAN)
    client = async_sdk(up.gw, opened["token"])
    completion = await client.chat.completions.create(model="up-model", messages=HELLO)
    assert completion.choices[0].message.content == "echo: hello there"
    sent = up.fake.last_request
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.json["model"] == "real-up-model"
    assert sent.json["max_tokens"] == 100  # absent from the request: set to the plan's cap
    assert opened["token"] not in sent.body.decode()
    assert all(opened["token"] not in value for value in sent.headers.values())


async def test_pinned_params_reach_the_upstream_and_may_not_be_overridden(up: Upstreamed) -> None:
    plan = {
        **UP_PLAN,
        "models": [{"name": "up-model", "max_tokens": 50, "params": {"temperature": 0}}],
    }
    _, client = up.session(plan)
    await client.chat.completions.create(model="up-model", messages=HELLO)
    assert up.fake.last_request.json["temperature"] == 0
    assert up.fake.last_request.json["max_tokens"] == 50
    await client.chat.completions.create(model="up-model", messages=HELLO, temperature=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(model="up-model", messages=HELLO, temperature=0.7)
    assert "temperature" in caught.value.message
    assert len(up.fake.requests) == 2


async def test_allow_listed_upstream_headers_pass_through_and_no_others(up: Upstreamed) -> None:
    up.fake.respond_with(
        json=_completion({"role": "assistant", "content": "hi"}),
        headers={
            "openai-processing-ms": "42",
            "x-ratelimit-remaining-requests": "99",
            "x-request-id": "upstream-req-1",
            "set-cookie": "upstream=secret",
            "x-internal-host": "10.0.0.7",
        },
    )
    _, client = up.session()
    raw = await client.chat.completions.with_raw_response.create(model="up-model", messages=HELLO)
    assert raw.headers["openai-processing-ms"] == "42"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    assert raw.headers["x-upstream-request-id"] == "upstream-req-1"
    assert raw.headers["x-request-id"] != "upstream-req-1"
    assert "set-cookie" not in raw.headers and "x-internal-host" not in raw.headers
    assert raw.parse().choices[0].message.content == "hi"


async def test_client_headers_stay_behind_and_the_request_id_goes_upstream(up: Upstreamed) -> None:
    opened = up.gw.open_session(UP_PLAN)
    client = async_sdk(up.gw, opened["token"])
    raw = await client.chat.completions.with_raw_response.create(
        model="up-model",
        messages=HELLO,
        extra_headers={"OpenAI-Organization": "org-client", "X-Client-Secret": "client-secret-1"},
    )
    sent = up.fake.last_request.headers
    assert sent["X-Request-Id"] == raw.headers["x-request-id"]
    assert "OpenAI-Organization" not in sent and "X-Client-Secret" not in sent
    assert "client-secret-1" not in str(dict(sent))


async def test_allow_listed_upstream_headers_pass_through_on_streams(up: Upstreamed) -> None:
    chunks = [_chunk({"role": "assistant", "content": "hi"}), _chunk({}, "stop")]
    up.fake.stream_with(chunks, headers={"x-ratelimit-remaining-requests": "99"})
    _, client = up.session()
    raw = await client.chat.completions.with_raw_response.create(
        model="up-model", messages=HELLO, stream=True
    )
    assert raw.headers.get("x-ratelimit-remaining-requests") == "99"


async def test_streaming_passes_through_and_usage_is_asked_of_the_upstream(up: Upstreamed) -> None:
    _, client = up.session()
    plain = [
        c
        async for c in await client.chat.completions.create(
            model="up-model", messages=HELLO, stream=True
        )
    ]
    assert up.fake.last_request.json["stream_options"] == {"include_usage": True}
    assert (
        "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == "echo: hello there"
    )
    assert all(c.usage is None and c.choices for c in plain)  # asked for billing, not shown
    with_usage = [
        c
        async for c in await client.chat.completions.create(
            model="up-model", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    ]
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 3
    assert up.fake.streams_completed == 2


async def test_embeddings_pass_through_in_both_encodings(up: Upstreamed) -> None:
    _, client = up.session()
    floats = await client.embeddings.create(
        model="up-embed", input=["a b", "c"], encoding_format="float"
    )
    assert up.fake.last_request.json["model"] == "real-up-embed"
    default = await client.embeddings.create(model="up-embed", input=["a b", "c"])
    assert up.fake.last_request.json["encoding_format"] == "base64"
    for f, b in zip(floats.data, default.data, strict=True):
        assert b.embedding == pytest.approx(f.embedding, rel=1e-6)


# --- errors ---------------------------------------------------------------------------------


async def test_upstream_400_passes_through_with_its_message(up: Upstreamed) -> None:
    up.fake.respond_with(
        status=400,
        json=_upstream_error("context is 9000 tokens, limit 8192", "context_length_exceeded"),
    )
    _, client = up.session()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="up-model", messages=HELLO)
    assert "context is 9000 tokens, limit 8192" in caught.value.message
    assert caught.value.code == "context_length_exceeded"


async def test_upstream_500_is_502_without_its_internals(up: Upstreamed) -> None:
    up.fake.respond_with(
        status=500, json={"error": {"message": "db at 10.0.0.7 exploded"}}, times=2
    )
    _, client = up.session()
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="up-model", messages=HELLO)
    error = openai_error(caught.value.response, 502)
    assert "10.0.0.7" not in caught.value.response.text and error["type"] == "upstream_error"
    status, _ = await _raw_stream(
        up.gw, client.api_key, {"model": "up-model", "messages": HELLO, "stream": True}
    )
    assert status == 502


async def test_upstream_rejecting_the_key_is_502_not_401(up: Upstreamed) -> None:
    up.fake.respond_with(
        status=401, json=_upstream_error("Incorrect API key provided", "invalid_api_key")
    )
    _, client = up.session()
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="up-model", messages=HELLO)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_auth_failed"


async def test_upstream_error_event_mid_stream_becomes_an_error_event_then_done(
    up: Upstreamed,
) -> None:
    up.fake.stream_with(
        [_chunk({"role": "assistant", "content": "par"}), {"error": {"message": "overloaded"}}]
    )
    session_id, client = up.session()
    status, events = await _raw_stream(
        up.gw, client.api_key, {"model": "up-model", "messages": HELLO, "stream": True}
    )
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "par"
    assert json.loads(events[-2])["error"]["type"] == "upstream_error"
    assert [e["kind"] for e in journal(up.redis_url, session_id)][-1] == "error"


async def test_upstream_dropping_the_connection_mid_stream_ends_with_an_error_event(
    up: Upstreamed,
) -> None:
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "a"}),
        _chunk({"content": "b"}),
    ]
    up.fake.stream_with(chunks, drop_after=2)
    _, client = up.session()
    status, events = await _raw_stream(
        up.gw, client.api_key, {"model": "up-model", "messages": HELLO, "stream": True}
    )
    assert status == 200 and events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert len(events) == 4


async def test_upstream_key_never_reaches_a_client_a_log_or_redis(
    up: Upstreamed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"Incorrect API key provided: {UPSTREAM_KEY}. Bearer {UPSTREAM_KEY}"
    up.fake.respond_with(status=400, json=_upstream_error(echo))
    up.fake.respond_with(status=401, json=_upstream_error(echo))
    up.fake.respond_with(status=500, json=_upstream_error(echo))
    up.fake.respond_with(status=422, body=echo.encode())
    up.fake.stream_with(
        [_chunk({"role": "assistant", "content": "x"}), {"error": {"message": echo}}]
    )
    opened = up.gw.open_session(UP_PLAN)
    seen: list[str] = []
    async with httpx.AsyncClient(timeout=30, headers=bearer(opened["token"])) as client:
        for _ in range(4):
            response = await client.post(
                up.gw.openai_base + "/chat/completions",
                json={"model": "up-model", "messages": HELLO},
            )
            assert response.status_code in (400, 422, 502), response.text
            seen.append(response.text + str(response.headers))
        stream = {"model": "up-model", "messages": HELLO, "stream": True}
        streamed = await client.post(up.gw.openai_base + "/chat/completions", json=stream)
        seen.append(streamed.text)
        ok = await client.post(
            up.gw.openai_base + "/chat/completions", json={"model": "up-model", "messages": HELLO}
        )
        assert ok.status_code == 200
        seen.append(ok.text + str(ok.headers))
    assert all(r.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" for r in up.fake.requests)
    for text in seen:
        assert "SECRET123456" not in text
    logged = (
        "\n".join(
            r.getMessage() + (r.exc_text or "") + str(getattr(r, "headers", ""))
            for r in caplog.records
        )
        + caplog.text
    )
    assert caplog.records  # the failures above were logged
    assert "SECRET123456" not in logged
    assert opened["token"] not in logged
    stored = all_redis_bytes(up.redis_url)
    assert b"journal:{sess:" + opened["session_id"].encode() + b"}" in stored
    assert b"SECRET123456" not in stored
    assert opened["token"].encode() not in stored


@pytest.mark.parametrize(
    "extra",
    [
        {"api_base": "http://127.0.0.1:1/v1"},
        {"base_url": "http://127.0.0.1:1/v1"},
        {"extra_body": {"api_base": "http://127.0.0.1:1/v1"}},
        {"metadata": {"api_base": "http://127.0.0.1:1/v1"}},
        {"metadata": {"routing": [{"Base-URL": "http://127.0.0.1:1/v1"}]}},
        {"deployment_id": "other"},
        {"custom_llm_provider": "azure"},
        {"api_key": "sk-someone-elses-key"},
    ],
    ids=lambda extra: json.dumps(extra)[:40],
)
async def test_fields_that_pick_an_upstream_are_403_and_reach_nothing(
    up: Upstreamed, extra: dict[str, Any]
) -> None:
    session_id, client = up.session()
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(model="up-model", messages=HELLO, extra_body=extra)
    assert caught.value.code == "capability_denied"
    assert "127.0.0.1:1" not in caught.value.response.text
    assert up.fake.requests == []
    assert journal(up.redis_url, session_id)[-1]["kind"] == "denial"


# --- the PEP on the answer ------------------------------------------------------------------


async def test_answer_calling_a_tool_outside_the_vcs_is_blocked_and_journaled(
    up: Upstreamed,
) -> None:
    up.fake.respond_with(json=_completion(_tool_call_message("delete_user"), "tool_calls"))
    session_id, client = up.session()
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(
            model="up-model", messages=HELLO, tools=[_offered("lookup_order")]
        )
    assert "delete_user" in caught.value.message
    assert "call_1" not in caught.value.response.text  # the blocked answer is not delivered
    errors = [e for e in journal(up.redis_url, session_id) if e["kind"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "capability_denied"
    assert "delete_user" in errors[0]["message"]


async def test_answer_calling_a_vcs_tool_the_request_did_not_offer_is_blocked(
    up: Upstreamed,
) -> None:
    up.fake.respond_with(json=_completion(_tool_call_message("cancel_order"), "tool_calls"))
    _, client = up.session()
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(
            model="up-model", messages=HELLO, tools=[_offered("lookup_order")]
        )
    assert "cancel_order" in caught.value.message


async def test_answer_calling_an_offered_tool_is_delivered(up: Upstreamed) -> None:
    up.fake.respond_with(json=_completion(_tool_call_message("lookup_order"), "tool_calls"))
    _, client = up.session()
    completion = await client.chat.completions.create(
        model="up-model", messages=HELLO, tools=[_offered("lookup_order")]
    )
    assert completion.choices[0].message.tool_calls[0].function.name == "lookup_order"  # type: ignore[index]


async def test_streamed_tool_call_outside_the_vcs_ends_with_an_error_event(up: Upstreamed) -> None:
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "delete_user", "arguments": ""},
    }
    up.fake.stream_with(
        [
            _chunk({"role": "assistant", "content": None}),
            _chunk({"tool_calls": [call]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
            _chunk({}, "tool_calls"),
        ]
    )
    session_id, client = up.session()
    body = {
        "model": "up-model",
        "messages": HELLO,
        "stream": True,
        "tools": [_offered("lookup_order")],
    }
    status, events = await _raw_stream(up.gw, client.api_key, body)
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "capability_denied" and "delete_user" in error["message"]
    assert not any("delete_user" in e for e in events[:-2])  # the call itself never went out
    errors = [e for e in journal(up.redis_url, session_id) if e["kind"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "capability_denied"


async def test_streamed_tool_call_outside_the_vcs_raises_in_the_sdk(up: Upstreamed) -> None:
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "delete_user", "arguments": "{}"},
    }
    up.fake.stream_with(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"tool_calls": [call]}),
            _chunk({}, "tool_calls"),
        ]
    )
    _, client = up.session()
    stream = await client.chat.completions.create(
        model="up-model", messages=HELLO, stream=True, tools=[_offered("lookup_order")]
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert "delete_user" in caught.value.message


async def test_a_denied_first_chunk_is_a_403_before_any_byte(up: Upstreamed) -> None:
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "delete_user", "arguments": "{}"},
    }
    up.fake.stream_with([_chunk({"role": "assistant", "content": None, "tool_calls": [call]}), _chunk({}, "tool_calls")])
    _, client = up.session()
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(
            model="up-model", messages=HELLO, stream=True, tools=[_offered("lookup_order")]
        )
    assert "delete_user" in caught.value.message
