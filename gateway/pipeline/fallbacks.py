"""A model's frozen fallback chain, tried in order when an upstream fails before answering.

Only the Assembly's chain is ever tried, never a model chosen at run time. A fallback gets
the same request with its own pinned upstream model and parameters, and its own token cap
when that is lower; it is charged at its own frozen price. A stream falls back only until
its first payload: after that, a failure belongs to the client's stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from typing import Any

from gateway.assembly.model import ModelGrant
from gateway.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.pipeline.dialects import pinned_params
from gateway.providers.base import (
    Endpoint,
    Opened,
    Provider,
    Reply,
    first_payload,
    relay,
    spoken_by_all,
)

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
        # A dialect passes through only if every model of the chain can be sent it.
        self.native_endpoints, self.speaks_chat = spoken_by_all(provider_for(m) for m in self._chain)

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        for model, asked, last in self._attempts(endpoint, body):
            provider = self._provider_for(model)
            try:
                reply = await provider.send(endpoint, asked, request_id=request_id)
            except GatewayError as exc:
                self._failed(model, exc, last)
                continue
            self.served, self.served_provider = model, provider
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
        for model, asked, last in self._attempts(endpoint, body):
            provider = self._provider_for(model)
            upstream = provider.stream(endpoint, asked, request_id=request_id, headers_out=headers_out)
            try:
                first = await first_payload(upstream)
            except GatewayError as exc:
                self._failed(model, exc, last)
                continue
            self.served, self.served_provider = model, provider
            return Opened(first, upstream)
        raise AssertionError("unreachable: the last attempt raises")

    async def close(self) -> None:
        return None  # the providers belong to the app

    def _attempts(self, endpoint: Endpoint, body: dict[str, Any]) -> Iterator[tuple[ModelGrant, dict[str, Any], bool]]:
        """Each model of the chain with the request as it is asked it, and whether it is the last."""
        for i, model in enumerate(self._chain):
            yield model, body if i == 0 else _for(model, endpoint, body), i + 1 == len(self._chain)

    def _failed(self, model: ModelGrant, exc: GatewayError, last: bool) -> None:
        if last or not falls_back(exc):
            raise exc
        self.attempts.append((model.name, exc.code))


def _for(model: ModelGrant, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
    """The request as the fallback model is asked it: its upstream, its pins (under the names
    of the dialect the body is in), its cap."""
    asked = {**body, **pinned_params(endpoint, model.params), "model": model.upstream_model}
    for key in _TOKEN_FIELDS:
        value = asked.get(key)
        if isinstance(value, int) and value > model.max_tokens:
            asked[key] = model.max_tokens
    return asked
