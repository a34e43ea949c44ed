"""Frozen fallbacks: when a model's upstream cannot answer, the next model of its chain in
the Assembly serves, at its own frozen price; the reservation covers the dearest of the
chain, the answer names who served, and a recorded replay reproduces it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
        # Cheaper than its fallback: the reservation must still cover the fallback.
        cheap = ModelSettings(name="cheap-chat", provider="primary", price=Price(input_per_mtok=0.01, output_per_mtok=0.01))
        settings = make_settings(
            providers=[*base.providers, ProviderSettings(name="primary", kind="openai", api_base=fake.base_url)],
            models=[*base.models, primary, cheap],
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


CHEAP_PLAN: dict[str, Any] = {
    "name": "cheap-first", "tenant": "acme",
    "models": [{"name": "cheap-chat", "max_tokens": 256, "fallbacks": ["gpt-4o"]}, {"name": "gpt-4o", "max_tokens": 256}],
    "budget": {"usd": 1},
}


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


UPSTREAM_ANSWER = {
    "id": "chatcmpl-p", "object": "chat.completion", "created": 1, "model": "primary-upstream",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the primary"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49},
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(st.sampled_from(["ok", "503", "429", "reset", "400"]), min_size=1, max_size=12))
async def test_a_fallback_chain_never_overspends_whatever_fails(chain: tuple[FakeUpstream, Gateway], redis_url: str, script: list[str]) -> None:
    fake, gw = chain
    fake.requests.clear()
    for outcome in script:
        if outcome == "ok":
            fake.respond_with(json=UPSTREAM_ANSWER)
        elif outcome == "reset":
            fake.respond_with(reset=True)
        else:
            fake.respond_with(status=int(outcome), json={"error": {"message": "scripted"}})
    # Less than one worst case of the dearest model (gpt-4o: 256 tokens at $10/M and a
    # prompt) but many of the cheap one: reserving only the cheap one's would let a few
    # fallback answers (about 0.2 m$ each) overspend it.
    opened = gw.open_session(CHEAP_PLAN, budget_usd=0.0005)
    statuses = [(await _chat(gw, opened["token"], model="cheap-chat")).status_code for _ in script]
    assert set(statuses) <= {200, 400, 429}
    shown = gw.session(opened["session_id"])
    journaled = sum(int(e.get(b"cost_nanos", 0)) for e in _journal(redis_url, opened["session_id"]))
    assert shown["reserved_nanos"] == 0
    assert shown["spent_nanos"] == journaled <= 500_000
