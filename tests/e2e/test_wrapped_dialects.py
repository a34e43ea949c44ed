"""Deployments and fallback chains pass a dialect through when every upstream that may serve
speaks it: the Anthropic Messages and Responses routes reach native upstreams (`kind:
anthropic`, `responses: native`) through both wrappers, against a real HTTP fake, and a
fallback is sent its own pinned parameters under the dialect's names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.capability import Keyring
from gateway.settings import DeploymentSettings, ModelSettings, Price, ProviderSettings
from tests.conftest import Gateway, assert_no_server_errors, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream

PRICE = Price(input_per_mtok=1, output_per_mtok=2)
PLAN: dict[str, Any] = {
    "name": "wrapped-dialects", "tenant": "acme", "budget": {"usd": 5},
    "models": [
        {"name": "claude-pair", "max_tokens": 50},
        {"name": "claude-first", "max_tokens": 50, "fallbacks": ["claude-second"]},
        {"name": "claude-second", "max_tokens": 40, "params": {"temperature": 0, "stop": ["END"]}},
        {"name": "gpt-pair", "max_tokens": 50},
    ],
}


@pytest.fixture
async def wrapped(redis_url: str, keyring: Keyring) -> AsyncIterator[tuple[FakeUpstream, Gateway]]:
    async with FakeUpstream() as fake:
        base = make_settings()
        providers = [
            ProviderSettings(name="claude-a", kind="anthropic", api_base=fake.base_url),
            ProviderSettings(name="claude-b", kind="anthropic", api_base=fake.base_url),
            ProviderSettings(name="oai-a", kind="openai", api_base=fake.base_url, responses="native"),
            ProviderSettings(name="oai-b", kind="openai", api_base=fake.base_url, responses="native"),
        ]
        models = [
            ModelSettings(name="claude-pair", provider="claude-a", upstream_model="claude-a-real", price=PRICE,
                          deployments=[DeploymentSettings(provider="claude-b", upstream_model="claude-b-real")]),
            ModelSettings(name="claude-first", provider="claude-a", upstream_model="claude-first-real", price=PRICE),
            ModelSettings(name="claude-second", provider="claude-b", upstream_model="claude-second-real", price=PRICE),
            ModelSettings(name="gpt-pair", provider="oai-a", upstream_model="gpt-a-real", price=PRICE,
                          deployments=[DeploymentSettings(provider="oai-b", upstream_model="gpt-b-real")]),
        ]
        gw = start_gateway(make_settings(providers=[*base.providers, *providers], models=[*base.models, *models]), redis_url, keyring)
        try:
            yield fake, gw
            assert_no_server_errors(gw)
        finally:
            gw.close()


def _client(gw: Gateway) -> httpx.AsyncClient:
    token = gw.open_session(PLAN)["token"]
    return httpx.AsyncClient(base_url=gw.openai_base, timeout=30, headers={"x-api-key": token, "Authorization": f"Bearer {token}"})


async def test_a_messages_call_reaches_a_native_deployment_as_it_is(wrapped: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = wrapped
    async with _client(gw) as client:
        answer = await client.post("/messages", json={"model": "claude-pair", "max_tokens": 20,
                                                      "messages": [{"role": "user", "content": "hi there"}]})
        streamed = await client.post("/messages", json={"model": "claude-pair", "max_tokens": 20, "stream": True,
                                                        "messages": [{"role": "user", "content": "hi again"}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["type"] == "message" and answer.json()["model"] in ("claude-a-real", "claude-b-real")
    assert streamed.status_code == 200 and "event: message_stop" in streamed.text
    assert [(r.path, r.json["model"] in ("claude-a-real", "claude-b-real")) for r in fake.requests] == [("/v1/messages", True)] * 2


async def test_a_messages_call_falls_back_natively_with_the_fallbacks_pins(wrapped: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = wrapped
    fake.respond_with(status=503, json={"type": "error", "error": {"type": "api_error", "message": "busy"}})
    async with _client(gw) as client:
        answer = await client.post("/messages", json={"model": "claude-first", "max_tokens": 50,
                                                      "messages": [{"role": "user", "content": "hello"}]})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-abc-served-by"] == "claude-second"
    first, second = fake.requests
    assert (first.path, first.json["model"]) == ("/v1/messages", "claude-first-real")
    assert (second.path, second.json["model"], second.json["max_tokens"]) == ("/v1/messages", "claude-second-real", 40)
    # Pinned in chat's names, sent in the Messages API's.
    assert (second.json["temperature"], second.json["stop_sequences"]) == (0, ["END"]) and "stop" not in second.json


async def test_a_responses_call_reaches_a_native_deployment_as_it_is(wrapped: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = wrapped
    async with _client(gw) as client:
        answer = await client.post("/responses", json={"model": "gpt-pair", "input": "hi there"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["object"] == "response"
    assert [(r.path, r.json["model"] in ("gpt-a-real", "gpt-b-real")) for r in fake.requests] == [("/v1/responses", True)]
