"""Builds one provider per configured provider; litellm is imported only if configured.

A provider with retries or a breaker configured is wrapped in a `ResilientProvider`.
"""

from __future__ import annotations

from gateway.providers.base import Provider
from gateway.providers.mock import MockProvider
from gateway.providers.openai_compat import AnthropicProvider, OpenAICompatProvider
from gateway.providers.resilience import Observe, ResilientProvider
from gateway.providers.transport import Client
from gateway.settings import ProviderSettings, Settings
from gateway.tracing import NOOP, Tracer


def build_providers(
    settings: Settings, http: Client, *, observe: Observe | None = None, tracer: Tracer = NOOP,
) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for spec in settings.providers:
        provider = _build(spec, http, tracer)
        if spec.retries.max or spec.breaker.failures:
            provider = ResilientProvider(provider, spec.retries, spec.breaker, observe=observe)
        providers[spec.name] = provider
    return providers


def _build(spec: ProviderSettings, http: Client, tracer: Tracer) -> Provider:
    if spec.kind == "mock":
        return MockProvider(spec, slow_delay_s=spec.slow_delay_s)
    if spec.kind == "openai":
        return OpenAICompatProvider(spec, http, tracer=tracer)
    if spec.kind == "anthropic":
        return AnthropicProvider(spec, http, tracer=tracer)
    from gateway.providers.litellm_provider import LiteLLMProvider

    return LiteLLMProvider(spec)


def breaker_states(providers: dict[str, Provider]) -> dict[str, str]:
    """Each breaker's state, for /readyz."""
    return {name: p.breaker.state for name, p in providers.items() if isinstance(p, ResilientProvider)}
