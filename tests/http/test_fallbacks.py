"""Frozen fallbacks: when a model's upstream cannot answer, the next model of its chain in
the Assembly serves, at its own frozen price; the reservation covers the dearest of the
chain, the answer names who served, and a recorded replay reproduces it."""

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
from tests.openai_support import bearer

HELLO = [{"role": "user", "content": "hello"}]
PLAN: dict[str, Any] = {
    "name": "fallbacks",
    "tenant": "acme",
    "models": [
        {"name": "primary-chat", "max_tokens": 64, "fallbacks": ["gpt-4o-mini"]},
        {"name": "gpt-4o-mini", "max_tokens": 32, "params": {"temperature": 0}},
    ],
    "budget": {"usd": 1},
}


@pytest.fixture
async def chain(redis_url: str, keyring: Keyring) -> AsyncIterator[tuple[FakeUpstream, Gateway]]:
    async with FakeUpstream() as fake:
        base = make_settings()
        primary = ModelSettings(name="primary-chat", provider="primary", price=Price(input_per_mtok=5, output_per_mtok=20))
        settings = make_settings(
            providers=[*base.providers, ProviderSettings(name="primary", kind="openai", api_base=fake.base_url)],
            models=[*base.models, primary],
        )
        gw = start_gateway(settings, redis_url, keyring)
        try:
            yield fake, gw
        finally:
            gw.close()


def _journal(redis_url: str, session_id: str) -> list[dict[bytes, bytes]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [fields for _, fields in client.xrange(redis_keys.journal(session_id))]
    finally:
        client.close()


async def _chat(gw: Gateway, token: str, **extra: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            gw.openai_base + "/chat/completions", headers=bearer(token),
            json={"model": "primary-chat", "messages": HELLO, **extra},
        )


def test_a_fallback_must_be_another_model_of_the_plan_of_the_same_kind(gateway: Gateway) -> None:
    plan = {**PLAN, "models": [
        {"name": "gpt-4o", "max_tokens": 8, "fallbacks": ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]},
        {"name": "text-embedding-3-small"},
    ]}
    response = gateway.admin.post("/admin/v1/plans/compile", json=plan)
    assert response.status_code == 422
    paths = {p["path"] for p in response.json()["error"]["problems"]}
    assert {"models.0.fallbacks.0", "models.0.fallbacks.1", "models.0.fallbacks.2"} <= paths


async def test_an_unavailable_upstream_falls_back_and_is_charged_the_fallbacks_price(
    chain: tuple[FakeUpstream, Gateway], redis_url: str
) -> None:
    fake, gw = chain
    fake.respond_with(status=503, json={"error": {"message": "overloaded"}})
    opened = gw.open_session(PLAN)
    response = await _chat(gw, opened["token"])
    assert response.status_code == 200, response.text
    assert response.headers["x-abc-served-by"] == "gpt-4o-mini"
    assert response.json()["model"] == "gpt-4o-mini-2024-07-18"
    assert len(fake.requests) == 1
    usage = response.json()["usage"]
    # gpt-4o-mini's frozen price, not primary-chat's: 0.15 and 0.60 USD per million tokens.
    expected = cost_nanos(usage["prompt_tokens"], 150_000_000) + cost_nanos(usage["completion_tokens"], 600_000_000)
    assert response.headers["x-abc-cost-usd"] == nanos_to_usd_str(expected)
    request, answer = _journal(redis_url, opened["session_id"])[-2:]
    # The reservation covered the dearest model of the chain: primary-chat's 64 tokens at $20/M.
    assert int(request[b"est_nanos"]) >= cost_nanos(64, 20_000_000_000)
    assert (answer[b"kind"], answer[b"served_by"], int(answer[b"cost_nanos"])) == (b"response", b"gpt-4o-mini", expected)
    assert answer[b"fallbacks_failed"] == b"primary-chat:upstream_error"
    shown = gw.session(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"]) == (expected, 0)

    # A recorded replay is answered by the same serving model, at the same price.
    replay = gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/replay", json={"mode": "recorded"}).json()
    again = await _chat(gw, replay["token"])
    assert again.status_code == 200 and again.content == response.content
    assert again.headers["x-abc-served-by"] == "gpt-4o-mini"
    assert again.headers["x-abc-cost-usd"] == response.headers["x-abc-cost-usd"]
    assert len(fake.requests) == 1


async def test_a_request_the_upstream_refuses_does_not_fall_back(chain: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = chain
    fake.respond_with(status=400, json={"error": {"message": "bad request", "param": "messages"}})
    opened = gw.open_session(PLAN)
    response = await _chat(gw, opened["token"])
    assert response.status_code == 400
    assert gw.session(opened["session_id"])["spent_nanos"] == 0


async def test_a_stream_falls_back_before_its_first_byte(chain: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = chain
    fake.respond_with(status=502, json={})
    opened = gw.open_session(PLAN)
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", gw.openai_base + "/chat/completions", headers=bearer(opened["token"]),
                                 json={"model": "primary-chat", "messages": HELLO, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and r.headers["x-abc-served-by"] == "gpt-4o-mini"
    assert lines[-1] == "data: [DONE]" and '"gpt-4o-mini-2024-07-18"' in lines[0]
