"""Native upstreams for the Responses API (`responses: native`) and Anthropic Messages
(`kind: anthropic`) through a running gateway, against a real HTTP fake that speaks them:
answers pass through byte for byte, while the upstream gets only what the PEP decided
(pinned model, capped tokens, frozen tool definitions, the conversation, the operator's key).
A chat-only upstream gets the same calls translated.

The fake runs on the test's event loop and the gateway on its own thread: calls use httpx.AsyncClient.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from gateway.capability import Keyring
from gateway.settings import ModelSettings, Price, ProviderSettings, load_settings
from tests.conftest import ROOT, Gateway, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream, native_answer, sent_bytes
from tests.openai_support import assert_no_server_errors, journal

UPSTREAM_KEY = "sk-test-NATIVE987654"
LOOKUP = {"name": "lookup_order", "description": "Find an order by id",
          "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}
PLAN: dict[str, Any] = {
    "name": "native", "tenant": "acme", "budget": {"usd": 5},
    "models": [{"name": "native-gpt", "max_tokens": 100}, {"name": "claude-x", "max_tokens": 100},
               {"name": "chat-up", "max_tokens": 100}],
    "tools": [LOOKUP, {**LOOKUP, "name": "cancel_order", "description": "Cancel an order"}],
}


@dataclass
class Native:
    fake: FakeUpstream
    gw: Gateway
    redis_url: str

    def open(self, plan: dict[str, Any] = PLAN) -> tuple[str, httpx.AsyncClient]:
        opened = self.gw.open_session(plan)
        client = httpx.AsyncClient(base_url=self.gw.base_url + "/v1", timeout=30,
                                   headers={"Authorization": f"Bearer {opened['token']}"})
        return opened["session_id"], client


@pytest.fixture
async def native(redis_url: str, keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Native]:
    monkeypatch.setenv("TEST_NATIVE_KEY", UPSTREAM_KEY)
    async with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        base = load_settings(ROOT / "config" / "gateway.yaml")
        price = Price(input_per_mtok=1.0, output_per_mtok=2.0)
        settings = make_settings(
            providers=[
                *base.providers,
                ProviderSettings(name="oai", kind="openai", api_base=fake.base_url, api_key_env="TEST_NATIVE_KEY",
                                 responses="native"),
                ProviderSettings(name="claude", kind="anthropic", api_base=fake.base_url, api_key_env="TEST_NATIVE_KEY"),
                ProviderSettings(name="vllm", kind="openai", api_base=fake.base_url, api_key_env="TEST_NATIVE_KEY"),
            ],
            models=[
                *base.models,
                ModelSettings(name="native-gpt", provider="oai", upstream_model="gpt-5-real", price=price),
                ModelSettings(name="claude-x", provider="claude", upstream_model="claude-real", price=price),
                ModelSettings(name="chat-up", provider="vllm", upstream_model="llama-real", price=price),
            ],
        )
        gw = start_gateway(settings, redis_url, keyring)
        try:
            yield Native(fake, gw, redis_url)
            assert_no_server_errors(gw)
        finally:
            gw.close()


def _upstream_bytes(fake: FakeUpstream, path: str) -> bytes:
    """The exact bytes the fake sent for its last request."""
    return sent_bytes(native_answer(path, fake.last_request.json))


async def test_a_native_responses_answer_passes_through_byte_for_byte(native: Native) -> None:
    session_id, client = native.open()
    async with client:
        answer = await client.post("/responses", json={"model": "native-gpt", "input": "where is my order",
                                                        "tools": [{"type": "function", "name": "lookup_order"}]})
    assert answer.status_code == 200, answer.text
    sent = native.fake.last_request
    assert sent.path == "/v1/responses" and sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.json["model"] == "gpt-5-real" and sent.json["max_output_tokens"] == 100
    assert sent.json["tools"] == [{"type": "function", **LOOKUP}]  # the frozen definition, not the client's
    assert answer.content == _upstream_bytes(native.fake, "/responses")
    assert b"\n  " in answer.content  # the upstream's own formatting, untouched
    entry = journal(native.redis_url, session_id)[-1]
    assert entry["kind"] == "response" and int(entry["tok_in"]) == 4 and int(entry["tok_out"]) > 0
    assert float(answer.headers["x-abc-cost-usd"]) > 0


async def test_a_native_responses_stream_passes_through_and_continues_by_previous_response_id(native: Native) -> None:
    _, client = native.open()
    async with client:
        streamed = await client.post("/responses", json={"model": "native-gpt", "input": "hello there", "stream": True})
        assert streamed.status_code == 200, streamed.text
        assert streamed.content == _upstream_bytes(native.fake, "/responses")
        stored = await client.get("/responses/resp_fake")
        follow = await client.post("/responses", json={"model": "native-gpt", "input": "and then",
                                                        "previous_response_id": "resp_fake"})
        assert follow.status_code == 200, follow.text
        again = await client.get("/responses/resp_fake")  # the fake reuses its id: now the newer one
    sent = native.fake.last_request.json
    assert "previous_response_id" not in sent  # the upstream never saw our ids: it got the conversation
    assert [i.get("role") or i.get("type") for i in sent["input"]] == ["user", "assistant", "user"]
    assert sent["input"][1]["content"][0]["text"] == "echo: hello there"
    assert stored.json()["output"][0]["content"][0]["text"] == "echo: hello there"
    assert again.json() == follow.json()


async def test_a_native_anthropic_answer_passes_through_with_its_own_key_header(native: Native) -> None:
    _, client = native.open()
    body = {"model": "claude-x", "max_tokens": 50, "messages": [{"role": "user", "content": "hello there"}]}
    async with client:
        plain = await client.post("/messages", json=body)
        sent = native.fake.last_request
        streamed = await client.post("/messages", json={**body, "stream": True})
        chat = await client.post("/chat/completions", json={"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]})
    assert plain.status_code == 200, plain.text
    assert sent.headers["x-api-key"] == UPSTREAM_KEY and "Authorization" not in sent.headers
    assert sent.headers["anthropic-version"] and sent.json["model"] == "claude-real" and sent.json["max_tokens"] == 50
    assert plain.content == sent_bytes(native_answer("/messages", sent.json))
    assert streamed.content == _upstream_bytes(native.fake, "/messages")
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "endpoint_not_supported"


async def test_a_native_answer_calling_a_tool_not_offered_is_denied(native: Native) -> None:
    _, client = native.open()
    rogue = {"id": "msg_x", "type": "message", "role": "assistant", "model": "claude-real", "stop_reason": "tool_use",
             "content": [{"type": "tool_use", "id": "toolu_1", "name": "cancel_order", "input": {}}],
             "usage": {"input_tokens": 3, "output_tokens": 4}}
    native.fake.respond_with(body=orjson.dumps(rogue))
    async with client:
        denied = await client.post("/messages", json={
            "model": "claude-x", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "lookup_order", "input_schema": {"type": "object"}}]})
    assert denied.status_code == 403 and denied.json()["type"] == "error"
    assert denied.json()["error"]["type"] == "permission_error" and "cancel_order" in denied.json()["error"]["message"]


async def test_a_chat_only_upstream_gets_the_responses_call_as_chat(native: Native) -> None:
    _, client = native.open()
    async with client:
        answer = await client.post("/responses", json={"model": "chat-up", "instructions": "Be brief.",
                                                        "input": [{"role": "user", "content": [
                                                            {"type": "input_text", "text": "hello"},
                                                            {"type": "input_text", "text": "there"}]}]})
    sent = native.fake.last_request
    assert sent.path == "/v1/chat/completions" and sent.json["max_tokens"] == 100
    assert sent.json["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "hello"},
                                                                  {"type": "text", "text": "there"}]}]
    assert answer.status_code == 200 and answer.json()["output"][0]["content"][0]["text"] == "echo: hello there"


async def test_with_plugins_on_a_native_upstream_is_asked_in_chat_form(native: Native) -> None:
    _, client = native.open({**PLAN, "name": "native-pii", "plugins": [{"name": "pii_redact"}]})
    async with client:
        answer = await client.post("/responses", json={"model": "native-gpt", "input": "mail me at jo@example.com"})
        sent = native.fake.last_request
        refused = await client.post("/messages", json={"model": "claude-x", "max_tokens": 20,
                                                        "messages": [{"role": "user", "content": "hi"}]})
    # The plugin rewrote the chat form, and that is what the upstream got.
    assert answer.status_code == 200 and sent.path == "/v1/chat/completions"
    assert "jo@example.com" not in sent.body.decode()
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "plugins_need_chat_form"
    assert native.fake.last_request is sent  # nothing reached the Anthropic upstream
