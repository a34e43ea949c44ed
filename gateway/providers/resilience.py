"""Retries and a circuit breaker around one provider, before any byte reached the client.

Only failures that a second try can cure are retried: the upstream unreachable or its
connection reset, and 500, 502, 503 and 504 (`UpstreamUnavailable`), and 429
(`UpstreamRateLimited`). A timeout is not retried: the attempt already took its time. Waits grow exponentially with full jitter, up to `max_backoff_s`; an
upstream's `Retry-After` is honoured up to the same cap. A stream is retried only until
its first payload: after that a failure belongs to the client's stream.

The breaker opens after `failures` consecutive failed attempts and then refuses calls
with 503 and `Retry-After` for `cooldown_s`; after the cool-down one probe goes through
(half-open), and its outcome closes or re-opens it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from typing import Any

from gateway.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from gateway.providers.base import Endpoint, Opened, Provider, Reply, first_payload, relay
from gateway.settings import BreakerSettings, RetrySettings

__all__ = ["FAILED_ATTEMPTS", "Breaker", "ResilientProvider", "retry_after_s", "retryable"]

Observe = Callable[[str, str], None]  # (provider, outcome of one attempt)

# The failed attempts of the current call, "provider:code" each, when its caller wants them:
# providers are shared by all calls, so a call's own record lives in its context.
FAILED_ATTEMPTS: ContextVar[list[str] | None] = ContextVar("failed_attempts", default=None)


def retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: never a 4xx that is the request's fault."""
    return isinstance(exc, (UpstreamUnavailable, UpstreamRateLimited))


def retry_after_s(exc: BaseException) -> float | None:
    value = getattr(exc, "retry_after_s", None)
    return float(value) if isinstance(value, (int, float)) else None


class Breaker:
    """Consecutive-failure circuit breaker for one deployment."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return self.CLOSED
        if self._clock() - self._opened_at < self._settings.cooldown_s:
            return self.OPEN
        return self.HALF_OPEN

    def admit(self) -> None:
        """Let one attempt through, or refuse it with 503 and when to come back."""
        state = self.state
        if state == self.CLOSED:
            return
        if state == self.HALF_OPEN and not self._probing:
            self._probing = True  # the one probe
            return
        assert self._opened_at is not None
        wait = max(1, round(self._settings.cooldown_s - (self._clock() - self._opened_at)))
        raise ServiceUnavailable(
            "the upstream is failing; its circuit breaker is open", code="upstream_circuit_open",
            extra={"retry_after_s": wait},
        )

    def record(self, ok: bool) -> None:
        self._probing = False
        if ok:
            self._failures, self._opened_at = 0, None
            return
        self._failures += 1
        if not self._settings.failures:
            return  # no breaker configured
        if self._opened_at is not None or self._failures >= self._settings.failures:
            self._opened_at = self._clock()  # a failed probe re-opens for a whole cool-down


class ResilientProvider:
    """A provider with retries and a breaker; the same Protocol, so the Exchange sees one call."""

    def __init__(
        self, inner: Provider, retries: RetrySettings, breaker: BreakerSettings, *,
        observe: Observe | None = None, sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.name = inner.name
        self.inner = inner
        # What the wrapped provider speaks besides chat (see gateway.pipeline.dialects).
        self.native_endpoints: frozenset[Endpoint] = getattr(inner, "native_endpoints", frozenset())
        self.speaks_chat: bool = getattr(inner, "speaks_chat", True)
        self.breaker = Breaker(breaker)
        self._retries = retries
        self._observe = observe or (lambda provider, outcome: None)
        self._sleep = sleep

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        attempt = 0
        while True:
            self.breaker.admit()
            try:
                reply = await self.inner.send(endpoint, body, request_id=request_id)
            except GatewayError as exc:
                attempt = await self._after_failure(exc, attempt)
                continue
            self._succeeded()
            return reply

    def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        return relay(lambda: self._open(endpoint, body, request_id=request_id, headers_out=headers_out))

    async def _open(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None, headers_out: dict[str, str] | None,
    ) -> Opened:
        attempt = 0
        while True:
            self.breaker.admit()
            upstream = self.inner.stream(endpoint, body, request_id=request_id, headers_out=headers_out)
            try:
                first = await first_payload(upstream)
            except GatewayError as exc:
                attempt = await self._after_failure(exc, attempt)
                continue
            self._succeeded()
            return Opened(first, upstream)

    async def close(self) -> None:
        await self.inner.close()

    def _succeeded(self) -> None:
        self.breaker.record(ok=True)
        self._observe(self.name, "ok")

    async def _after_failure(self, exc: GatewayError, attempt: int) -> int:
        """Record the failed attempt; wait and return the next attempt number, or re-raise."""
        if not retryable(exc):
            self._observe(self.name, "refused")
            raise exc
        self.breaker.record(ok=False)
        failed = FAILED_ATTEMPTS.get()
        if failed is not None:
            failed.append(f"{self.name}:{exc.status}")
        if attempt >= self._retries.max:
            self._observe(self.name, "failed")
            raise exc
        self._observe(self.name, "retried")
        await self._sleep(self._wait(exc, attempt))
        return attempt + 1

    def _wait(self, exc: BaseException, attempt: int) -> float:
        cap = self._retries.max_backoff_s
        told = retry_after_s(exc)
        if told is not None:
            return min(told, cap)
        # Full jitter: spreads the retries of many clients that failed together.
        return random.uniform(0, min(cap, self._retries.backoff_s * 2**attempt))
