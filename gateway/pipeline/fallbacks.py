"""A model's frozen fallback chain, tried in order when an upstream fails before answering.

Only the Assembly's chain is ever tried, never a model chosen at run time. A fallback gets
the same request with its own pinned upstream model and parameters, and its own token cap
when that is lower; it is charged at its own frozen price. A stream falls back only until
its first payload: after that, a failure belongs to the client's stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from gateway.assembly.model import ModelGrant
from gateway.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.base import Endpoint, Provider, Reply

__all__ = ["FallbackChain", "falls_back"]

_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def falls_back(exc: GatewayError) -> bool:
    """An upstream that could not answer, as opposed to one that refused the request."""
    if isinstance(exc, ServiceUnavailable):
        return exc.code == "upstream_circuit_open"
    return isinstance(exc, (UpstreamUnavailable, UpstreamRateLimited, UpstreamTimeout))


class FallbackChain:
    """The Provider the Exchange calls for a model with fallbacks; `served` says who answered."""

    name = "fallbacks"

    def __init__(self, chain: Sequence[ModelGrant], provider_for: Callable[[ModelGrant], Provider]) -> None:
        self._chain = tuple(chain)
        self._provider_for = provider_for
        self.served: ModelGrant = self._chain[0]
        self.served_provider: Provider | None = None
        self.attempts: list[tuple[str, str]] = []  # (model, error code) of each one that failed

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        for model, asked, last in self._attempts(body):
            provider = self._provider_for(model)
            try:
                reply = await provider.send(endpoint, asked, request_id=request_id)
            except GatewayError as exc:
                self._failed(model, exc, last)
                continue
            self.served, self.served_provider = model, provider
            return reply
        raise AssertionError("unreachable: the last attempt raises")

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        for model, asked, last in self._attempts(body):
            provider = self._provider_for(model)
            upstream = provider.stream(endpoint, asked, request_id=request_id, headers_out=headers_out)
            try:
                first = await anext(upstream, None)
            except GatewayError as exc:
                await upstream.aclose()
                self._failed(model, exc, last)
                continue
            self.served, self.served_provider = model, provider
            try:
                if first is not None:
                    yield first
                    async for payload in upstream:
                        yield payload
            finally:
                await upstream.aclose()
            return

    async def close(self) -> None:
        return None  # the providers belong to the app

    def _attempts(self, body: dict[str, Any]) -> list[tuple[ModelGrant, dict[str, Any], bool]]:
        primary = self._chain[0]
        out = [(primary, body, len(self._chain) == 1)]
        for i, model in enumerate(self._chain[1:], start=2):
            out.append((model, _for(model, body), i == len(self._chain)))
        return out

    def _failed(self, model: ModelGrant, exc: GatewayError, last: bool) -> None:
        if last or not falls_back(exc):
            raise exc
        self.attempts.append((model.name, exc.code))


def _for(model: ModelGrant, body: dict[str, Any]) -> dict[str, Any]:
    """The request as the fallback model is asked it: its upstream, its pins, its cap."""
    asked = {**body, **model.params, "model": model.upstream_model}
    for key in _TOKEN_FIELDS:
        value = asked.get(key)
        if isinstance(value, int) and value > model.max_tokens:
            asked[key] = model.max_tokens
    return asked
