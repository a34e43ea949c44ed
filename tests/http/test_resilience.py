"""Retries and the breaker seen from a client: a flaky upstream is retried before any byte,
an open breaker answers 503 with Retry-After, and /readyz and /metrics show both."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.capability import Keyring
from gateway.settings import BreakerSettings, ModelSettings, Price, ProviderSettings, RetrySettings
from tests.conftest import Gateway, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream
from tests.openai_support import bearer

PLAN = {"name": "flaky", "tenant": "acme", "models": [{"name": "flaky-chat", "max_tokens": 64}], "budget": {"usd": 1}}
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def flaky(redis_url: str, keyring: Keyring) -> AsyncIterator[tuple[FakeUpstream, Gateway]]:
    async with FakeUpstream() as fake:
        base = make_settings()
        provider = ProviderSettings(
            name="flaky", kind="openai", api_base=fake.base_url,
            retries=RetrySettings(max=2, backoff_s=0.01, max_backoff_s=0.05),
            breaker=BreakerSettings(failures=3, cooldown_s=60),
        )
        model = ModelSettings(name="flaky-chat", provider="flaky", price=Price(input_per_mtok=1, output_per_mtok=2))
        gw = start_gateway(make_settings(providers=[*base.providers, provider], models=[*base.models, model]), redis_url, keyring)
        try:
            yield fake, gw
        finally:
            gw.close()


async def _chat(gw: Gateway, token: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(gw.openai_base + "/chat/completions", headers=bearer(token), json={"model": "flaky-chat", "messages": HELLO})


@pytest.mark.parametrize("status", [503, 529])  # 529: Anthropic's "overloaded"
async def test_a_failing_upstream_is_retried_and_charged_once(flaky: tuple[FakeUpstream, Gateway], status: int) -> None:
    fake, gw = flaky
    fake.respond_with(status=status, json={})
    opened = gw.open_session(PLAN)
    response = await _chat(gw, opened["token"])
    assert response.status_code == 200, response.text
    assert len(fake.requests) == 2
    shown = gw.session(opened["session_id"])
    assert shown["requests"] == 1 and shown["reserved_nanos"] == 0
    assert shown["spent_usd"] == response.headers["x-abc-cost-usd"]
    answer = [e for e in gw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"] if e["kind"] == "response"]
    assert answer[0]["attempts_failed"] == "flaky:502"
    metrics = httpx.get(gw.base_url + "/metrics").text
    assert 'abc_upstream_attempts_total{outcome="retried",provider="flaky"} 1.0' in metrics


async def test_an_open_breaker_answers_503_with_retry_after(flaky: tuple[FakeUpstream, Gateway]) -> None:
    fake, gw = flaky
    fake.respond_with(status=500, json={}, times=3)  # one call: three attempts, three failures
    token = gw.open_session(PLAN)["token"]
    assert (await _chat(gw, token)).status_code == 502
    refused = await _chat(gw, token)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "upstream_circuit_open"
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert len(fake.requests) == 3
    assert httpx.get(gw.base_url + "/readyz").json()["breakers"] == {"flaky": "open"}
