"""Providers beyond OpenAI's wire format, through litellm, against real HTTP fakes on
loopback: Anthropic Messages (tools, streaming, usage), an Azure OpenAI deployment URL,
Bedrock's Converse API, and Gemini's GenerateContent API (streaming and not). Each is
driven with the official openai SDK through a running gateway, and charged the frozen
price of the usage the upstream reported, in the answer's headers and in the journal.

What litellm 1.80 reaches with a plain `api_base` and the packages of requirements.lock:
Bedrock Converse through its `converse_like/` route with a Bedrock API key (a bearer),
non-streaming only (Bedrock streams AWS event-stream frames, which litellm decodes with
botocore); Gemini through its `gemini` route (a key, SSE streams). Vertex AI needs
google-auth for every call, which the lock does not have."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis

from gateway import redis_keys
from gateway.capability import Keyring
from gateway.money import cost_nanos, nanos_to_usd_str
from gateway.settings import ModelSettings, Price, ProviderSettings
from tests.conftest import Gateway, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream
from tests.openai_support import async_sdk, bearer, journal

KEY = "sk-ant-test-SECRET-0123456789"
PRICE = Price(input_per_mtok=3, output_per_mtok=15)
IN_NANOS, OUT_NANOS = 3_000_000_000, 15_000_000_000
TOOL = {"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order by id",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}}
PLAN: dict[str, Any] = {
    "name": "beyond-openai", "tenant": "acme",
    "models": [{"name": "claude", "max_tokens": 64}, {"name": "azure-4o", "max_tokens": 64},
               {"name": "bedrock-claude", "max_tokens": 64}, {"name": "gemini-flash", "max_tokens": 64}],
    "tools": [{"name": "lookup_order", "description": "Find an order by id", "parameters": TOOL["function"]["parameters"]}],
    "budget": {"usd": 1},
}
MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-pinned",
    "content": [{"type": "text", "text": "Looking it up"},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup_order", "input": {"order_id": "7"}}],
    "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 31, "output_tokens": 12},
}
EVENTS = [
    {"type": "message_start", "message": {"id": "msg_2", "type": "message", "role": "assistant", "model": "claude-pinned",
                                          "content": [], "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": 13, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 5}},
    {"type": "message_stop"},
]

BEDROCK_MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
CONVERSE = {
    "output": {"message": {"role": "assistant", "content": [{"text": "Hello from Bedrock"}]}},
    "stopReason": "end_turn", "usage": {"inputTokens": 17, "outputTokens": 7, "totalTokens": 24}, "metrics": {"latencyMs": 12},
}
GEMINI = {
    "candidates": [{"content": {"parts": [{"text": "Hello from Gemini"}], "role": "model"}, "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 19, "candidatesTokenCount": 8, "totalTokenCount": 27}, "modelVersion": "gemini-2.0-flash-001",
}
GEMINI_STREAM = [
    {"candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}, "index": 0}],
     "usageMetadata": {"promptTokenCount": 21, "candidatesTokenCount": 1, "totalTokenCount": 22}},
    {"candidates": [{"content": {"parts": [{"text": "lo there"}], "role": "model"}, "finishReason": "STOP", "index": 0}],
     "usageMetadata": {"promptTokenCount": 21, "candidatesTokenCount": 9, "totalTokenCount": 30}},
]


@pytest.fixture
async def beyond(redis_url: str, keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[FakeUpstream, Gateway]]:
    monkeypatch.setenv("LL_KEY", KEY)
    async with FakeUpstream() as fake:
        root = fake.base_url.removesuffix("/v1")
        base = make_settings()
        settings = make_settings(
            providers=[
                *base.providers,
                ProviderSettings(name="anthropic", kind="litellm", litellm_provider="anthropic", api_base=root, api_key_env="LL_KEY"),
                ProviderSettings(name="azure", kind="litellm", litellm_provider="azure", api_base=root, api_key_env="LL_KEY",
                                 api_version="2024-10-21"),
                # litellm's converse_like route posts to api_base as it is: the model's Converse URL.
                ProviderSettings(name="bedrock", kind="litellm", litellm_provider="bedrock", api_key_env="LL_KEY",
                                 api_base=f"{root}/model/{BEDROCK_MODEL}/converse"),
                ProviderSettings(name="gemini", kind="litellm", litellm_provider="gemini", api_base=f"{root}/v1beta",
                                 api_key_env="LL_KEY"),
            ],
            models=[
                *base.models,
                ModelSettings(name="claude", provider="anthropic", upstream_model="claude-pinned", price=PRICE),
                ModelSettings(name="azure-4o", provider="azure", upstream_model="my-deployment", price=PRICE),
                ModelSettings(name="bedrock-claude", provider="bedrock", upstream_model=f"converse_like/{BEDROCK_MODEL}", price=PRICE),
                ModelSettings(name="gemini-flash", provider="gemini", upstream_model="gemini-2.0-flash-001", price=PRICE),
            ],
        )
        gw = start_gateway(settings, redis_url, keyring)
        try:
            yield fake, gw
        finally:
            gw.close()


def _cost(prompt: int, completion: int) -> str:
    return nanos_to_usd_str(cost_nanos(prompt, IN_NANOS) + cost_nanos(completion, OUT_NANOS))


async def test_anthropic_messages_with_a_tool_call_is_charged_its_reported_usage(beyond: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = beyond
    fake.respond_with(json=MESSAGE)
    client = async_sdk(gw, gw.open_session(PLAN)["token"])
    raw = await client.chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "user", "content": "where is order 7?"}], tools=[TOOL],
    )
    answer = raw.parse()
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.id, call.function.name, call.function.arguments) == ("toolu_1", "lookup_order", '{"order_id": "7"}')  # type: ignore[union-attr]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (31, 12)  # type: ignore[union-attr]
    assert raw.headers["x-abc-cost-usd"] == _cost(31, 12)
    sent = fake.requests[0]
    assert sent.path == "/v1/messages" and sent.json["model"] == "claude-pinned"
    assert sent.headers["x-api-key"] == KEY and sent.json["tools"][0]["name"] == "lookup_order"


async def test_an_anthropic_stream_is_relayed_and_charged_its_usage(beyond: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = beyond
    fake.stream_with(EVENTS, include_done=False)
    opened = gw.open_session(PLAN)
    client = async_sdk(gw, opened["token"])
    stream = await client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hi there"
    shown = gw.session(opened["session_id"])
    assert nanos_to_usd_str(shown["spent_nanos"]) == _cost(13, 5) and shown["reserved_nanos"] == 0


async def test_an_azure_deployment_url_is_called_with_its_key_and_version(beyond: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = beyond
    fake.respond_with(json={
        "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi from azure"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    })
    client = async_sdk(gw, gw.open_session(PLAN)["token"])
    raw = await client.chat.completions.with_raw_response.create(model="azure-4o", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "hi from azure"
    assert raw.headers["x-abc-cost-usd"] == _cost(9, 4)
    sent = fake.requests[0]
    assert sent.path == "/openai/deployments/my-deployment/chat/completions"
    assert sent.headers["api-key"] == KEY and sent.query == "api-version=2024-10-21"


def _answer_entry(redis_url: str, session_id: str) -> dict[str, str]:
    """The journal entry that closed the session's one call, its body left out."""
    client = redis.Redis.from_url(redis_url)
    try:
        entries = [fields for _, fields in client.xrange(redis_keys.journal(session_id))]
    finally:
        client.close()
    (entry,) = [{k.decode(): v.decode() for k, v in e.items() if k != b"body"} for e in entries
                if e[b"kind"] in (b"response", b"stream", b"error")]
    return entry


async def test_a_bedrock_converse_call_is_charged_its_reported_usage(beyond: tuple[FakeUpstream, Gateway], redis_url: str) -> None:
    fake, gw = beyond
    fake.respond_with(json=CONVERSE)
    opened = gw.open_session(PLAN)
    client = async_sdk(gw, opened["token"])
    raw = await client.chat.completions.with_raw_response.create(model="bedrock-claude", messages=[{"role": "user", "content": "hi"}])
    answer = raw.parse()
    assert answer.choices[0].message.content == "Hello from Bedrock" and answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (17, 7)  # type: ignore[union-attr]
    assert raw.headers["x-abc-cost-usd"] == _cost(17, 7)
    entry = _answer_entry(redis_url, opened["session_id"])
    assert (entry["tok_in"], entry["tok_out"], int(entry["cost_nanos"])) == ("17", "7", cost_nanos(17, IN_NANOS) + cost_nanos(7, OUT_NANOS))
    sent = fake.requests[0]
    assert sent.path == f"/model/{BEDROCK_MODEL}/converse" and sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.json["messages"] == [{"role": "user", "content": [{"text": "hi"}]}] and sent.json["inferenceConfig"]["maxTokens"] == 64
    assert KEY not in str(journal(redis_url, opened["session_id"]))


async def test_a_gemini_call_and_stream_are_charged_their_reported_usage(beyond: tuple[FakeUpstream, Gateway], redis_url: str) -> None:
    fake, gw = beyond
    fake.respond_with(json=GEMINI)
    opened = gw.open_session(PLAN)
    client = async_sdk(gw, opened["token"])
    raw = await client.chat.completions.with_raw_response.create(model="gemini-flash", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "Hello from Gemini"
    assert raw.headers["x-abc-cost-usd"] == _cost(19, 8)
    sent = fake.requests[0]
    assert (sent.path, sent.headers["x-goog-api-key"]) == ("/v1beta/models/gemini-2.0-flash-001:generateContent", KEY)
    assert sent.json["generationConfig"]["max_output_tokens"] == 64

    fake.stream_with(GEMINI_STREAM, include_done=False)
    streamed = gw.open_session(PLAN)
    stream = await async_sdk(gw, streamed["token"]).chat.completions.create(
        model="gemini-flash", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello there"
    assert (fake.requests[1].path, fake.requests[1].query) == ("/v1beta/models/gemini-2.0-flash-001:streamGenerateContent", "alt=sse")
    entry = _answer_entry(redis_url, streamed["session_id"])
    assert (entry["kind"], entry["tok_in"], entry["tok_out"], entry["usage_from"]) == ("stream", "21", "9", "upstream")
    shown = gw.session(streamed["session_id"])
    assert nanos_to_usd_str(shown["spent_nanos"]) == _cost(21, 9) and shown["reserved_nanos"] == 0


async def test_a_streamed_bedrock_call_fails_rather_than_being_faked(beyond: tuple[FakeUpstream, Gateway], redis_url: str) -> None:
    # litellm cannot read a Converse stream without botocore: the call fails, it is not faked.
    fake, gw = beyond
    fake.respond_with(json=CONVERSE)
    opened = gw.open_session(PLAN)
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(gw.openai_base + "/chat/completions", headers=bearer(opened["token"]), json={
            "model": "bedrock-claude", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["type"] and KEY not in response.text
    entry = _answer_entry(redis_url, opened["session_id"])
    # Like any stream that failed before its first chunk: its prompt, nothing generated.
    assert (entry["kind"], entry["tok_out"]) == ("error", "0")
    prompt_cost = cost_nanos(int(entry["tok_in"]), IN_NANOS)
    assert int(entry["cost_nanos"]) == prompt_cost
    shown = gw.session(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"]) == (prompt_cost, 0)
