"""Builds one provider per configured provider; litellm is imported only if configured."""

from __future__ import annotations

import aiohttp

from gateway.providers.base import Provider
from gateway.providers.mock import MockProvider
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.settings import Settings


def build_providers(settings: Settings, http: aiohttp.ClientSession) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for spec in settings.providers:
        if spec.kind == "mock":
            providers[spec.name] = MockProvider(spec)
        elif spec.kind == "openai":
            providers[spec.name] = OpenAICompatProvider(spec, http)
        else:
            from gateway.providers.litellm_provider import LiteLLMProvider

            providers[spec.name] = LiteLLMProvider(spec)
    return providers
