"""Deployments with their own price: frozen into the Assembly at compile (so its id changes
with it), the reservation covers the dearest deployment, a call is charged the price of the
deployment that served it, the journal names that deployment, and a recorded replay
reproduces both."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.assembly.compile import compile_plan, worst_case_nanos
from gateway.assembly.plan import Plan
from gateway.capability import Keyring
from gateway.money import cost_nanos, nanos_to_usd_str
from gateway.settings import DeploymentSettings, ModelSettings, Price, ProviderSettings, Settings
from tests.conftest import Gateway, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream
from tests.openai_support import bearer, journal

HELLO = [{"role": "user", "content": "hello"}]
PLAN: dict[str, Any] = {"name": "priced-deployments", "tenant": "acme", "models": [{"name": "split-chat", "max_tokens": 64}],
                        "budget": {"usd": 1}}
EAST_NANOS = (1_000_000_000, 2_000_000_000)  # the model's price: $1 and $2 per million tokens
WEST_NANOS = (10_000_000_000, 40_000_000_000)  # the west deployment's own: $10 and $40


def _settings(base_url: str, *, west_price: Price | None) -> Settings:
    base = make_settings()
    # The frozen order, east first, decides among equally idle deployments.
    model = ModelSettings(
        name="split-chat", provider="east", upstream_model="gpt-east", price=Price(input_per_mtok=1, output_per_mtok=2),
        deployments=[DeploymentSettings(provider="west", upstream_model="gpt-west", price=west_price)], balance="least_in_flight",
    )
    return make_settings(
        providers=[*base.providers, ProviderSettings(name="east", kind="openai", api_base=base_url),
                   ProviderSettings(name="west", kind="openai", api_base=base_url)],
        models=[*base.models, model],
    )


@pytest.fixture
async def priced(redis_url: str, keyring: Keyring) -> AsyncIterator[tuple[FakeUpstream, Gateway]]:
    async with FakeUpstream() as fake:
        gw = start_gateway(_settings(fake.base_url, west_price=Price(input_per_mtok=10, output_per_mtok=40)), redis_url, keyring)
        try:
            yield fake, gw
        finally:
            gw.close()


def _cost(usage: dict[str, int], nanos: tuple[int, int]) -> int:
    return cost_nanos(usage["prompt_tokens"], nanos[0]) + cost_nanos(usage["completion_tokens"], nanos[1])


async def _chat(gw: Gateway, token: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(gw.openai_base + "/chat/completions", headers=bearer(token), json={"model": "split-chat", "messages": HELLO})


def test_a_deployments_own_price_is_frozen_into_the_assembly_and_its_id() -> None:
    plan = Plan.model_validate(PLAN)
    own = compile_plan(plan, _settings("http://127.0.0.1:9/v1", west_price=Price(input_per_mtok=10, output_per_mtok=40))).assembly
    shared = compile_plan(plan, _settings("http://127.0.0.1:9/v1", west_price=None)).assembly
    east, west = own.models["split-chat"].deployments
    assert east.price is None  # the model's own price
    assert west.price is not None and (west.price.input_nanos_per_mtok, west.price.output_nanos_per_mtok) == WEST_NANOS
    # A deployment at the model's price is stored without one, as before deployments had prices.
    assert "price" not in shared.model_dump(mode="json")["models"]["split-chat"]["deployments"][1]
    assert own.id != shared.id
    # The worst case the compiler checks budgets against is the dearest deployment's.
    assert worst_case_nanos(own.models["split-chat"], 0) == cost_nanos(64, WEST_NANOS[1])
    assert worst_case_nanos(shared.models["split-chat"], 0) == cost_nanos(64, EAST_NANOS[1])


async def test_each_call_is_charged_the_price_of_the_deployment_that_served_it(
    priced: tuple[FakeUpstream, Gateway], redis_url: str
) -> None:
    fake, gw = priced
    fake.respond_with(status=503, json={"error": {"message": "east is overloaded"}})  # east fails: west serves
    opened = gw.open_session(PLAN)
    by_west = await _chat(gw, opened["token"])
    by_east = await _chat(gw, opened["token"])
    assert by_west.status_code == by_east.status_code == 200, (by_west.text, by_east.text)
    assert [r.json["model"] for r in fake.requests] == ["gpt-east", "gpt-west", "gpt-east"]
    west_cost, east_cost = _cost(by_west.json()["usage"], WEST_NANOS), _cost(by_east.json()["usage"], EAST_NANOS)
    assert by_west.headers["x-abc-cost-usd"] == nanos_to_usd_str(west_cost)
    assert by_east.headers["x-abc-cost-usd"] == nanos_to_usd_str(east_cost)

    entries = journal(redis_url, opened["session_id"])
    requests = [e for e in entries if e["kind"] == "request"]
    answers = [e for e in entries if e["kind"] == "response"]
    # Each reservation covered the dearest deployment: 64 tokens out at west's $40/M.
    assert all(int(r["est_nanos"]) >= cost_nanos(64, WEST_NANOS[1]) for r in requests)
    assert [(a["deployment"], int(a["cost_nanos"])) for a in answers] == [("west:gpt-west", west_cost), ("east:gpt-east", east_cost)]
    shown = gw.session(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"]) == (west_cost + east_cost, 0)

    # A recorded replay is charged the same deployments' prices and journals them, with no upstream call.
    replay = gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/replay", json={"mode": "recorded"}).json()
    again = [await _chat(gw, replay["token"]), await _chat(gw, replay["token"])]
    assert [r.headers["x-abc-cost-usd"] for r in again] == [by_west.headers["x-abc-cost-usd"], by_east.headers["x-abc-cost-usd"]]
    replayed = [e for e in journal(redis_url, replay["session_id"]) if e["kind"] == "response"]
    assert [(a["deployment"], int(a["cost_nanos"])) for a in replayed] == [("west:gpt-west", west_cost), ("east:gpt-east", east_cost)]
    assert len(fake.requests) == 3
