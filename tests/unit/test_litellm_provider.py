"""The litellm provider translates through litellm and only calls the configured api_base."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.providers.base import Endpoint
from gateway.settings import ProviderSettings
from tests.fakes.upstream import FakeUpstream

KEY = "sk-litellm-test-SECRET-0123456789"


async def test_chat_goes_through_litellm_to_the_configured_base(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.providers.litellm_provider import LiteLLMProvider

    monkeypatch.setenv("LITELLM_TEST_KEY", KEY)
    async with FakeUpstream() as fake:
        spec = ProviderSettings(name="ll", kind="litellm", litellm_provider="openai", api_base=fake.base_url, api_key_env="LITELLM_TEST_KEY")
        provider = LiteLLMProvider(spec)
        reply = await provider.send(Endpoint.CHAT, {"model": "pinned-model", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16})
        chunks = [c async for c in provider.stream(Endpoint.CHAT, {"model": "pinned-model", "messages": [{"role": "user", "content": "hi"}], "stream": True})]
    assert reply.data["choices"][0]["message"]["content"]
    assert reply.data["usage"]["prompt_tokens"] > 0
    assert len(chunks) >= 2
    first = fake.requests[0]
    assert first.json["model"] == "pinned-model"
    assert first.headers["Authorization"] == f"Bearer {KEY}"
    assert KEY.encode() not in reply.body


async def test_upstream_error_through_litellm_does_not_echo_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.errors import GatewayError
    from gateway.providers.litellm_provider import LiteLLMProvider

    monkeypatch.setenv("LITELLM_TEST_KEY", KEY)
    async with FakeUpstream() as fake:
        fake.respond_with(status=400, json={"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error"}})
        provider = LiteLLMProvider(ProviderSettings(name="ll", kind="litellm", litellm_provider="openai", api_base=fake.base_url, api_key_env="LITELLM_TEST_KEY"))
        with pytest.raises(GatewayError) as caught:
            await provider.send(Endpoint.CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert KEY not in caught.value.message
    assert KEY.encode() not in caught.value.to_json()


def test_serving_without_a_litellm_provider_never_imports_litellm() -> None:
    code = (
        "import sys; from gateway.app import create_app; from gateway.settings import load_settings; "
        "from gateway.capability import Keyring; "
        "create_app(load_settings('config/gateway.yaml'), redis_url='redis://127.0.0.1:1', keyring=Keyring.from_sources('x'*40)); "
        "import gateway.tokenizer; print('litellm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_provider_built_in_the_event_loop_imports_litellm_on_a_thread_and_its_first_call_waits() -> None:
    # A fresh interpreter: the import must not have happened yet in this process.
    code = """
import asyncio, threading
from gateway.providers import litellm_provider
from gateway.settings import ProviderSettings
importers = []
real = litellm_provider._import_litellm
def recording():
    importers.append(threading.current_thread() is threading.main_thread())
    return real()
litellm_provider._import_litellm = recording
async def main():
    provider = litellm_provider.LiteLLMProvider(ProviderSettings(name="ll", kind="litellm", litellm_provider="openai"))
    built_without_it = provider._litellm is None
    module = await provider._module()
    print(built_without_it, importers, module.drop_params, module.__name__)
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True [False] False litellm"
