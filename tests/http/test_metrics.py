"""/metrics: the GenAI semantic-convention metrics, the operational gauges and counters, and
label cardinality that does not grow with sessions or requests."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import httpx

from tests.conftest import ADMIN_TOKEN, Gateway
from tests.metrics_support import counter

PLAN: dict[str, Any] = {
    "name": "metrics-test",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 16}],
    "budget": {"usd": 1.0},
}
SESSIONS = 1000
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
UNLISTED_TOOL = {"type": "function", "function": {"name": "refund", "parameters": {"type": "object", "properties": {}}}}


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def chat(client: httpx.Client, token: str, **extra: Any) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})


async def test_series_do_not_grow_with_sessions(gw: Gateway) -> None:
    assembly_id = gw.compile(PLAN)
    # aiohttp rather than httpx: a thousand sessions, and the client shares the GIL with the gateway.
    async with aiohttp.ClientSession(gw.base_url) as client:

        async def session(variety: bool) -> None:
            async with client.post("/admin/v1/sessions", json={"assembly_id": assembly_id}, headers=ADMIN) as opened:
                headers = {"Authorization": f"Bearer {(await opened.json())['token']}"}
            for extra, status in ((({}, 200), ({"stream": True}, 200), ({"tools": [UNLISTED_TOOL]}, 403)) if variety else (({}, 200),)):
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
                async with client.post("/v1/chat/completions", json=body, headers=headers) as answer:
                    await answer.read()
                    assert answer.status == status

        async def sessions(count: int, variety: bool) -> None:
            for start in range(0, count, 10):  # 10 at a time
                await asyncio.gather(*(session(variety) for _ in range(min(10, count - start))))

        async def scrape() -> str:
            async with client.get("/metrics") as response:
                return await response.text()

        await sessions(10, variety=True)  # every kind of outcome: every series there is
        await scrape()  # the scrape's own series
        before = series(await scrape())
        await sessions(SESSIONS - 10, variety=False)
        text = await scrape()
    after = series(text)
    assert after == before, sorted(after ^ before)[:10]
    assert counter(text, "abc_requests_total", route="/admin/v1/sessions", status="201") == SESSIONS
    assert counter(text, "abc_requests_total", route="/v1/chat/completions", status="200") == SESSIONS + 10
    assert not re.search(r"sess_[0-9a-f]{8}|req_[0-9a-f]{8}", text)


def test_genai_and_operational_metrics_are_exposed(gw: Gateway) -> None:
    token = gw.token(PLAN, budget_usd=0.5)
    with httpx.Client(base_url=gw.base_url, timeout=10) as client:
        usage = chat(client, token).json()["usage"]
        assert chat(client, token, stream=True).status_code == 200
        text = client.get("/metrics").text
    genai = 'gen_ai_operation_name="chat",gen_ai_provider_name="mock",gen_ai_request_model="gpt-4o-mini",gen_ai_response_model="gpt-4o-mini"'
    assert f'gen_ai_client_token_usage_sum{{{genai},gen_ai_token_type="input"}}' in text
    assert counter(text, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 2
    assert counter(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") >= usage["completion_tokens"]
    assert counter(text, "gen_ai_server_request_duration_seconds_count", error_type="") == 2
    assert counter(text, "gen_ai_server_time_to_first_token_seconds_count") == 1  # the streamed call
    assert counter(text, "gen_ai_server_time_per_output_token_seconds_count") == 1
    assert counter(text, "abc_requests_in_flight") == 1  # this scrape
    remaining = counter(text, "abc_budget_remaining_nanos", tenant="acme")
    assert 0 < remaining < 0.5e9
    for name in ("abc_redis_errors_total", "abc_reaper_settlements_total"):
        assert f"# TYPE {name} counter" in text
