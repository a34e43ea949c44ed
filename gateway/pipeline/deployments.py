"""Choosing among a model's frozen deployments: weighted, or the least in flight.

A deployment shares the model's frozen price or has its own, frozen too: the reservation
covers the dearest, and the call is charged the price of the one that served (`served`).
A deployment whose provider's breaker is open is skipped; when an attempt fails in a way
another upstream may not (unreachable, 429, 5xx, a timeout), the next deployment is
tried, before any byte reached the client. The in-flight counts are per process.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from gateway.assembly.model import Deployment, ModelGrant
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.pipeline.fallbacks import falls_back
from gateway.providers.base import (
    Endpoint,
    Opened,
    Provider,
    Reply,
    first_payload,
    relay,
    spoken_by_all,
)
from gateway.providers.resilience import ResilientProvider

__all__ = ["Balancer", "Deployments"]


class Balancer:
    """The process's in-flight count per deployment, and the random source for weights."""

    def __init__(self, rng: Callable[[], float] = random.random) -> None:
        self.in_flight: Counter[tuple[str, str]] = Counter()
        self._rng = rng

    def order(self, grant: ModelGrant, providers: Mapping[str, Provider]) -> list[Deployment]:
        """The deployments to try, best first; those behind an open breaker are left out."""
        usable = [d for d in grant.deployments if not _open(providers.get(d.provider))]
        if grant.balance == "least_in_flight":
            # Stable sort: among equals, the frozen order (and so the weights' intent) holds.
            return sorted(usable, key=lambda d: self.in_flight[(d.provider, d.upstream_model)])
        ordered: list[Deployment] = []
        while usable:
            pick = self._weighted(usable)
            ordered.append(pick)
            usable.remove(pick)
        return ordered

    def _weighted(self, choices: list[Deployment]) -> Deployment:
        point = self._rng() * sum(d.weight for d in choices)
        for d in choices:
            point -= d.weight
            if point < 0:
                return d
        return choices[-1]


def _open(provider: Provider | None) -> bool:
    return isinstance(provider, ResilientProvider) and provider.breaker.state == "open"


class Deployments:
    """The Provider the Exchange calls for a model with deployments; `served` says which."""

    name = "deployments"

    def __init__(self, grant: ModelGrant, providers: Mapping[str, Provider], balancer: Balancer) -> None:
        self._grant = grant
        self._providers = providers
        self._balancer = balancer
        self.served: Deployment | None = None
        # A dialect passes through only if every deployment can be sent it.
        self.native_endpoints, self.speaks_chat = spoken_by_all(providers.get(d.provider) for d in grant.deployments)

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        order = self._order()
        for i, d in enumerate(order):
            key = (d.provider, d.upstream_model)
            self._balancer.in_flight[key] += 1
            try:
                reply = await self._providers[d.provider].send(endpoint, {**body, "model": d.upstream_model}, request_id=request_id)
            except GatewayError as exc:
                if i + 1 == len(order) or not falls_back(exc):
                    raise
                continue
            finally:
                self._balancer.in_flight[key] -= 1
            self.served = d
            return reply
        raise AssertionError("unreachable: the last attempt raises")

    def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        return relay(lambda: self._open(endpoint, body, request_id=request_id, headers_out=headers_out))

    async def _open(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None, headers_out: dict[str, str] | None,
    ) -> Opened:
        order = self._order()
        in_flight = self._balancer.in_flight
        for i, d in enumerate(order):
            key = (d.provider, d.upstream_model)
            in_flight[key] += 1
            try:
                upstream = self._providers[d.provider].stream(
                    endpoint, {**body, "model": d.upstream_model}, request_id=request_id, headers_out=headers_out,
                )
                first = await first_payload(upstream)
            except BaseException as exc:
                in_flight[key] -= 1
                if not isinstance(exc, GatewayError) or i + 1 == len(order) or not falls_back(exc):
                    raise
                continue
            self.served = d

            def done(key: tuple[str, str] = key) -> None:
                in_flight[key] -= 1

            return Opened(first, upstream, on_close=done)
        raise AssertionError("unreachable: the last attempt raises")

    async def close(self) -> None:
        return None  # the providers belong to the app

    def _order(self) -> list[Deployment]:
        order = self._balancer.order(self._grant, self._providers)
        if not order:
            raise ServiceUnavailable(
                f"every deployment of {self._grant.name!r} is failing; their circuit breakers are open",
                code="upstream_circuit_open", extra={"retry_after_s": 5},
            )
        return order
