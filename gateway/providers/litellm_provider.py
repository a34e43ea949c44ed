"""Providers reached through litellm's translation (Anthropic, Bedrock, Vertex, ...).

litellm is imported here, only when a provider of kind `litellm` is configured, and on
a thread once the provider is built: its import takes seconds (about 9 s on the 2-core
machine of the README's figures), and the gateway listens and serves its other models
meanwhile; a call through litellm that comes first waits for the import. Its price map is
read from the installed package, never fetched.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.base import Endpoint, Reply
from gateway.providers.openai_compat import RETRYABLE_STATUSES, scrub
from gateway.settings import ProviderSettings

log = logging.getLogger("gateway.providers.litellm")


_imported: list[Any] = []  # litellm, once imported and configured (by whichever thread)


def _import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    # httpx's own transport, not litellm's aiohttp one (read as litellm is imported: some
    # clients are made then): litellm caches its clients for the process and never closes
    # them, and an aiohttp session left open leaves a pending task and an "Unclosed
    # connector" behind when its loop ends.
    os.environ.setdefault("DISABLE_AIOHTTP_TRANSPORT", "True")
    import litellm

    litellm.telemetry = False
    litellm.drop_params = False  # a parameter the target can't take is an error, not silently lost
    _imported[:] = [litellm]
    return litellm


def _said_why(importing: asyncio.Future[Any]) -> None:
    if not importing.cancelled() and importing.exception() is not None:
        log.error("litellm could not be imported: %s", type(importing.exception()).__name__)


class LiteLLMProvider:
    def __init__(self, settings: ProviderSettings) -> None:
        self.name = settings.name
        self._settings = settings
        self._prefix = settings.litellm_provider or ""
        self._litellm: Any = _imported[0] if _imported else None
        self._importing: asyncio.Future[Any] | None = None
        if self._litellm is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # built outside a loop (a tool, a test): import now
                self._litellm = _import_litellm()
            else:
                self._importing = loop.run_in_executor(None, _import_litellm)
                self._importing.add_done_callback(_said_why)

    async def _module(self) -> Any:
        if self._litellm is None:
            assert self._importing is not None
            try:
                self._litellm = await asyncio.shield(self._importing)
            except Exception:  # logged once, when the import failed
                raise UpstreamError("the litellm provider is not available on this gateway") from None
        return self._litellm

    def _kwargs(self, body: dict[str, Any]) -> dict[str, Any]:
        model = str(body["model"])
        kwargs = {**body, "model": f"{self._prefix}/{model}" if self._prefix else model}
        # Only the operator's settings choose where the call goes and with which key.
        kwargs["api_key"] = self._settings.api_key()
        if self._settings.api_base:
            kwargs["api_base"] = self._settings.api_base
        if self._settings.api_version:
            kwargs["api_version"] = self._settings.api_version
        kwargs["timeout"] = self._settings.timeouts.total_s or self._settings.timeouts.idle_s
        kwargs["num_retries"] = 0
        return kwargs

    def _error(self, exc: Exception) -> GatewayError:
        status = getattr(exc, "status_code", None)
        message = scrub(str(getattr(exc, "message", "") or "upstream error"), [self._settings.api_key()])[:2000]
        if isinstance(exc, TimeoutError) or type(exc).__name__ == "Timeout":
            return UpstreamTimeout("upstream timed out")
        if status in (400, 404, 422):
            return InvalidRequest(message, status=status)
        if status == 429:
            return UpstreamRateLimited("upstream rate limit")
        if status in RETRYABLE_STATUSES or type(exc).__name__ in ("APIConnectionError", "ServiceUnavailableError"):
            return UpstreamUnavailable(f"upstream error (status {status or 'unknown'})")
        return UpstreamError(f"upstream error (status {status or 'unknown'})")

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        llm = await self._module()
        call = {Endpoint.CHAT: llm.acompletion, Endpoint.COMPLETIONS: llm.atext_completion, Endpoint.EMBEDDINGS: llm.aembedding}[endpoint]
        try:
            response = await call(**self._kwargs(body))
        except Exception as exc:  # litellm raises its own tree; translate all of it here
            raise self._error(exc) from None
        data = response.model_dump(mode="json", exclude_none=False)
        data.pop("_hidden_params", None)
        raw = orjson.dumps(data)
        return Reply(body=raw, data=data)

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        llm = await self._module()
        call = llm.acompletion if endpoint is Endpoint.CHAT else llm.atext_completion
        try:
            response = await call(**self._kwargs(body))
            async for chunk in response:
                yield orjson.dumps(chunk.model_dump(mode="json", exclude_none=True))
        except GatewayError:
            raise
        except Exception as exc:
            raise self._error(exc) from None

    async def close(self) -> None:
        return None
