"""Retries and the circuit breaker, around the `openai` provider and a real HTTP fake upstream."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import (
    InvalidRequest,
    ServiceUnavailable,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from gateway.providers.base import Endpoint
from gateway.providers.resilience import Breaker, ResilientProvider
from gateway.settings import BreakerSettings, RetrySettings
from tests.fakes.upstream import FakeUpstream
from tests.unit.test_openai_compat import (
    CHAT_BODY,
    MakeProvider,
    chunk,
    collect,
    make_provider,
    session,
    upstream,
)

__all__ = ["make_provider", "session", "upstream"]  # fixtures, imported to be found
OK: dict[str, Any] = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}


class Sleeps:
    """Records the waits instead of sleeping them."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def resilient(make: MakeProvider, fake: FakeUpstream, *, retries: int = 3, failures: int = 0, sleeps: Sleeps | None = None,
              outcomes: list[str] | None = None) -> ResilientProvider:
    return ResilientProvider(
        make(fake.base_url), RetrySettings(max=retries, backoff_s=0.1, max_backoff_s=2.0),
        BreakerSettings(failures=failures, cooldown_s=30), sleep=sleeps or Sleeps(),
        observe=None if outcomes is None else (lambda provider, outcome: outcomes.append(outcome)),
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
async def test_a_retryable_status_is_tried_again(upstream: FakeUpstream, make_provider: MakeProvider, status: int) -> None:
    upstream.respond_with(status=status, json={"error": {"message": "busy"}})
    upstream.respond_with(json=OK)
    outcomes: list[str] = []
    reply = await resilient(make_provider, upstream, outcomes=outcomes).send(Endpoint.CHAT, CHAT_BODY)
    assert reply.data == OK and len(upstream.requests) == 2
    assert outcomes == ["retried", "ok"]


async def test_a_reset_connection_is_tried_again(upstream: FakeUpstream, make_provider: MakeProvider) -> None:
    upstream.respond_with(reset=True)
    upstream.respond_with(json=OK)
    assert (await resilient(make_provider, upstream).send(Endpoint.CHAT, CHAT_BODY)).data == OK


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_a_request_the_upstream_refuses_is_never_retried(upstream: FakeUpstream, make_provider: MakeProvider, status: int) -> None:
    upstream.respond_with(status=status, json={"error": {"message": "no"}}, times=2)
    outcomes: list[str] = []
    with pytest.raises(Exception) as caught:
        await resilient(make_provider, upstream, outcomes=outcomes).send(Endpoint.CHAT, CHAT_BODY)
    assert not isinstance(caught.value, (UpstreamUnavailable, UpstreamRateLimited))
    assert len(upstream.requests) == 1 and outcomes == ["refused"]
    if status in (400, 404, 422):
        assert isinstance(caught.value, InvalidRequest)


async def test_retries_stop_at_the_cap_with_the_last_error(upstream: FakeUpstream, make_provider: MakeProvider) -> None:
    upstream.respond_with(status=503, json={}, times=5)
    sleeps = Sleeps()
    with pytest.raises(UpstreamUnavailable):
        await resilient(make_provider, upstream, retries=2, sleeps=sleeps).send(Endpoint.CHAT, CHAT_BODY)
    assert len(upstream.requests) == 3
    # Full jitter under an exponential ceiling: 0.1 then 0.2.
    assert len(sleeps.waits) == 2 and 0 <= sleeps.waits[0] <= 0.1 and 0 <= sleeps.waits[1] <= 0.2


async def test_retry_after_is_honoured_up_to_the_cap(upstream: FakeUpstream, make_provider: MakeProvider) -> None:
    upstream.respond_with(status=429, json={}, headers={"Retry-After": "1.5"})
    upstream.respond_with(status=429, json={}, headers={"Retry-After": "60"})
    upstream.respond_with(json=OK)
    sleeps = Sleeps()
    await resilient(make_provider, upstream, sleeps=sleeps).send(Endpoint.CHAT, CHAT_BODY)
    assert sleeps.waits == [1.5, 2.0]


async def test_a_stream_is_retried_only_before_its_first_payload(upstream: FakeUpstream, make_provider: MakeProvider) -> None:
    upstream.respond_with(status=502, json={})
    upstream.stream_with([chunk("a"), chunk("b"), chunk("c")], drop_after=2)
    provider = resilient(make_provider, upstream)
    got: list[bytes] = []
    with pytest.raises(Exception):
        async for payload in provider.stream(Endpoint.CHAT, {**CHAT_BODY, "stream": True}):
            got.append(payload)
    # The 502 was retried; the cut after two chunks was not: the client already had them.
    assert len(got) == 2 and len(upstream.requests) == 2


async def test_the_breaker_opens_after_consecutive_failures_and_refuses_with_retry_after(
    upstream: FakeUpstream, make_provider: MakeProvider
) -> None:
    upstream.respond_with(status=500, json={}, times=3)
    provider = resilient(make_provider, upstream, retries=0, failures=3)
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable):
            await provider.send(Endpoint.CHAT, CHAT_BODY)
    with pytest.raises(ServiceUnavailable) as caught:
        await provider.send(Endpoint.CHAT, CHAT_BODY)
    assert caught.value.code == "upstream_circuit_open" and caught.value.extra["retry_after_s"] == 30
    assert len(upstream.requests) == 3  # the open breaker sent nothing
    assert provider.breaker.state == "open"
    assert (await collect_or_error(provider)) == "upstream_circuit_open"


async def collect_or_error(provider: ResilientProvider) -> str:
    try:
        await collect(provider)  # type: ignore[arg-type]
    except ServiceUnavailable as exc:
        return exc.code
    return "served"


def test_the_breaker_half_opens_for_one_probe_after_the_cool_down() -> None:
    now = [0.0]
    breaker = Breaker(BreakerSettings(failures=2, cooldown_s=10), clock=lambda: now[0])
    breaker.record(ok=False)
    breaker.admit()
    breaker.record(ok=False)
    assert breaker.state == "open"
    with pytest.raises(ServiceUnavailable):
        breaker.admit()
    now[0] = 10.5
    assert breaker.state == "half_open"
    breaker.admit()  # the probe
    with pytest.raises(ServiceUnavailable):
        breaker.admit()  # a second caller during the probe
    breaker.record(ok=False)  # the probe failed: a whole new cool-down
    assert breaker.state == "open"
    now[0] = 21.0
    breaker.admit()
    breaker.record(ok=True)
    assert breaker.state == "closed"
    breaker.admit()
