"""Load balancing over a model's frozen deployments, with the built-in mock provider."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from gateway.assembly.model import Deployment, FrozenPrice, ModelGrant
from gateway.pipeline.deployments import Balancer, Deployments
from gateway.providers.base import Endpoint
from gateway.providers.mock import MockProvider
from gateway.settings import ProviderSettings

PRICE = FrozenPrice(input_nanos_per_mtok=1, output_nanos_per_mtok=1, source="settings")
BODY = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def grant(*deployments: Deployment, balance: str = "weighted") -> ModelGrant:
    first = deployments[0]
    return ModelGrant(
        name="balanced", provider=first.provider, provider_kind="mock", upstream_model=first.upstream_model,
        max_tokens=4, price=PRICE, deployments=deployments, balance=balance,
    )


def mocks(*names: str) -> dict[str, MockProvider]:
    return {name: MockProvider(ProviderSettings(name=name, kind="mock")) for name in names}


async def test_a_thousand_calls_over_weights_3_to_1_land_within_5_percent_of_75_25() -> None:
    model = grant(Deployment(provider="a", upstream_model="gpt-a", weight=3), Deployment(provider="b", upstream_model="gpt-b", weight=1))
    providers = mocks("a", "b")
    balancer = Balancer(rng=random.Random(20261202).random)
    served: Counter[str] = Counter()
    for _ in range(1000):
        chosen = Deployments(model, providers, balancer)
        reply = await chosen.send(Endpoint.CHAT, BODY)
        assert chosen.served is not None and reply.data["model"] == chosen.served.upstream_model
        served[chosen.served.provider] += 1
    assert 700 <= served["a"] <= 800 and served["a"] + served["b"] == 1000


async def test_least_in_flight_prefers_the_idle_deployment() -> None:
    # The mock answers a model named "...slow..." after a delay: deployment a is busy.
    model = grant(
        Deployment(provider="a", upstream_model="gpt-slow-a"), Deployment(provider="b", upstream_model="gpt-b"),
        balance="least_in_flight",
    )
    providers = {"a": MockProvider(ProviderSettings(name="a", kind="mock"), slow_delay_s=0.5), **mocks("b")}
    balancer = Balancer()
    busy = Deployments(model, providers, balancer)
    first = asyncio.ensure_future(busy.send(Endpoint.CHAT, BODY))
    await asyncio.sleep(0.05)
    assert balancer.in_flight[("a", "gpt-slow-a")] == 1
    idle = Deployments(model, providers, balancer)
    await idle.send(Endpoint.CHAT, BODY)
    assert idle.served is not None and idle.served.provider == "b"
    await first
    assert busy.served is not None and busy.served.provider == "a"
    assert balancer.in_flight[("a", "gpt-slow-a")] == 0


async def test_a_failing_deployment_hands_the_call_to_the_next() -> None:
    # The mock fails a model named "...error..." with an upstream error, which does not fall over:
    # only failures another upstream may cure move on. A timeout is one of those.
    model = grant(Deployment(provider="a", upstream_model="gpt-slow-a"), Deployment(provider="b", upstream_model="gpt-b"))
    from gateway.settings import TimeoutSettings

    providers = {
        "a": MockProvider(ProviderSettings(name="a", kind="mock", timeouts=TimeoutSettings(first_byte_s=0.01)), slow_delay_s=1),
        **mocks("b"),
    }
    balancer = Balancer(rng=lambda: 0.0)  # always picks a first
    chosen = Deployments(model, providers, balancer)
    reply = await chosen.send(Endpoint.CHAT, BODY)
    assert chosen.served is not None and chosen.served.provider == "b" and reply.data["model"] == "gpt-b"


def test_a_model_given_only_deployments_is_served_by_the_first_and_the_rest() -> None:
    from gateway.settings import ModelSettings

    m = ModelSettings.model_validate({"name": "m", "deployments": [
        {"provider": "a", "upstream_model": "m-east", "weight": 3}, {"provider": "b", "upstream_model": "m-west"},
    ]})
    assert (m.provider, m.target, m.weight) == ("a", "m-east", 3)
    assert [(d.provider, d.upstream_model, d.weight) for d in m.deployments] == [("b", "m-west", 1)]


def test_the_first_deployments_price_is_the_models_and_is_given_once() -> None:
    import pydantic
    import pytest

    from gateway.settings import ModelSettings

    m = ModelSettings.model_validate({"name": "m", "deployments": [
        {"provider": "a", "price": {"input_per_mtok": 1, "output_per_mtok": 2}},
        {"provider": "b", "price": {"input_per_mtok": 3, "output_per_mtok": 4}},
    ]})
    assert m.price is not None and (m.price.input_per_mtok, m.price.output_per_mtok) == (1, 2)
    assert m.deployments[0].price is not None and m.deployments[0].price.output_per_mtok == 4
    with pytest.raises(pydantic.ValidationError, match="give its price once"):
        ModelSettings.model_validate({"name": "m", "price": {"input_per_mtok": 1, "output_per_mtok": 2}, "deployments": [
            {"provider": "a", "price": {"input_per_mtok": 5, "output_per_mtok": 5}}, {"provider": "b"},
        ]})
