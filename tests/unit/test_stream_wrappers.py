"""The three provider wrappers (retries, deployments, fallbacks) relay a stream the same way:
the first payload, then the rest, and the upstream closed however the stream ends, a client
that hangs up included; and they pass on the dialects every wrapped provider speaks."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import pytest

from gateway.assembly.model import Deployment, FrozenPrice, ModelGrant
from gateway.errors import UpstreamUnavailable
from gateway.pipeline.deployments import Balancer, Deployments
from gateway.pipeline.fallbacks import FallbackChain
from gateway.providers.base import Endpoint, Provider, Reply, spoken_by_all
from gateway.providers.resilience import ResilientProvider
from gateway.settings import BreakerSettings, RetrySettings

PRICE = FrozenPrice(input_nanos_per_mtok=1, output_nanos_per_mtok=1, source="settings")
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Scripted:
    """A provider whose streams fail before their first payload `fail_first` times, then yield three."""

    def __init__(self, name: str, *, fail_first: int = 0, native: frozenset[Endpoint] = frozenset(), chat: bool = True) -> None:
        self.name = name
        self.native_endpoints = native
        self.speaks_chat = chat
        self.fail_first = fail_first
        self.opened = self.closed = 0

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        raise NotImplementedError

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        self.opened += 1
        try:
            if self.fail_first:
                self.fail_first -= 1
                raise UpstreamUnavailable("upstream error (status 503)")
            for i in range(3):
                yield f'{{"n":{i},"model":"{body["model"]}"}}'.encode()
        finally:
            self.closed += 1

    async def close(self) -> None:
        return None


def _grant(name: str, *deployments: Deployment, fallbacks: tuple[str, ...] = ()) -> ModelGrant:
    provider = deployments[0].provider if deployments else name
    return ModelGrant(name=name, provider=provider, provider_kind="openai", upstream_model=f"{name}-up", max_tokens=4,
                      price=PRICE, deployments=deployments, fallbacks=fallbacks)


def _retrying(inner: Scripted) -> Provider:
    return ResilientProvider(inner, RetrySettings(max=1, backoff_s=0), BreakerSettings(), sleep=lambda _: _noop())


async def _noop() -> None:
    return None


def _deployed(inner: Scripted) -> Provider:
    spare = Scripted("spare")
    model = _grant("m", Deployment(provider=inner.name, upstream_model="m-up"), Deployment(provider="spare", upstream_model="m-spare"))
    return Deployments(model, {inner.name: inner, "spare": spare}, Balancer(rng=lambda: 0.0))


def _chained(inner: Scripted) -> Provider:
    primary, fallback = _grant("m", fallbacks=("f",)), _grant("f")
    spare = Scripted("spare")
    return FallbackChain([primary, fallback], lambda model: inner if model is primary else spare)


WRAPPERS: list[Callable[[Scripted], Provider]] = [_retrying, _deployed, _chained]


@pytest.mark.parametrize("wrap", WRAPPERS, ids=["retries", "deployments", "fallbacks"])
async def test_a_stream_the_client_leaves_closes_the_upstream(wrap: Callable[[Scripted], Provider]) -> None:
    inner = Scripted("inner")
    stream = wrap(inner).stream(Endpoint.CHAT, BODY)
    assert b'"n":0' in await anext(stream)
    await stream.aclose()  # the client hung up after the first payload
    assert (inner.opened, inner.closed) == (1, 1)


@pytest.mark.parametrize("wrap", WRAPPERS, ids=["retries", "deployments", "fallbacks"])
async def test_a_stream_that_fails_before_its_first_payload_is_closed_and_another_answers(wrap: Callable[[Scripted], Provider]) -> None:
    inner = Scripted("inner", fail_first=1)
    payloads = [p async for p in wrap(inner).stream(Endpoint.CHAT, BODY)]
    assert len(payloads) == 3
    assert inner.closed == inner.opened  # every stream it opened was closed


async def test_a_deployment_is_no_longer_in_flight_once_its_stream_is_left() -> None:
    inner, balancer = Scripted("inner"), Balancer(rng=lambda: 0.0)
    model = _grant("m", Deployment(provider="inner", upstream_model="m-up"))
    stream = Deployments(model, {"inner": inner}, balancer).stream(Endpoint.CHAT, BODY)
    await anext(stream)
    assert balancer.in_flight[("inner", "m-up")] == 1
    await stream.aclose()
    assert balancer.in_flight[("inner", "m-up")] == 0


def test_a_wrapper_speaks_a_dialect_only_if_every_provider_it_may_call_does() -> None:
    messages, responses = frozenset({Endpoint.MESSAGES}), frozenset({Endpoint.RESPONSES})
    a, b = Scripted("a", native=messages, chat=False), Scripted("b", native=messages, chat=False)
    assert spoken_by_all([a, b]) == (messages, False)
    assert spoken_by_all([a, Scripted("c", native=responses)]) == (frozenset(), False)
    assert spoken_by_all([Scripted("d"), Scripted("e")]) == (frozenset(), True)
    model = _grant("m", Deployment(provider="a", upstream_model="a-up"), Deployment(provider="b", upstream_model="b-up"))
    deployed = Deployments(model, {"a": a, "b": b}, Balancer())
    assert (deployed.native_endpoints, deployed.speaks_chat) == (messages, False)
    primary, fallback = _grant("p", fallbacks=("f",)), _grant("f")
    chained = FallbackChain([primary, fallback], lambda m: a if m is primary else Scripted("chat-only"))
    assert chained.native_endpoints == frozenset()
