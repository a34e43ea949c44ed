"""Streams are billed exactly: the upstream's usage chunk when it sends one (asked for even
when the client did not, and then hidden), the streamed text counted with tiktoken when it
does not, and on a client disconnect exactly what was generated up to the cut."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
import redis

from gateway import redis_keys
from gateway.capability import Keyring
from gateway.money import NANOS_PER_USD, cost_nanos
from gateway.providers.mock import answer_text, chat_completion
from gateway.providers.mock_content import text_pieces
from gateway.settings import ModelSettings, Price, ProviderSettings, Settings
from gateway.state.entries import entry_body
from gateway.tokenizer import count_chat_prompt, count_text
from tests.conftest import OPEN_PLAN, Gateway, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream
from tests.openai_support import bearer

HELLO = [{"role": "user", "content": "tell me about budgets"}]
ENCODING = "o200k_base"
PRICE = Price(input_per_mtok=1.0, output_per_mtok=2.0)
IN_NANOS, OUT_NANOS = 1_000_000_000, 2_000_000_000  # per million tokens, frozen from PRICE
PLAN: dict[str, Any] = {
    **OPEN_PLAN,
    "name": "streams",
    "models": [
        {"name": "gpt-4o-mini", "max_tokens": 256},
        {"name": "mock-nousage", "max_tokens": 256},
        {"name": "fake-chat", "max_tokens": 256},
    ],
}


@dataclass
class Env:
    gw: Gateway
    fake: FakeUpstream
    redis_url: str

    def session(self) -> dict[str, Any]:
        return self.gw.open_session(PLAN)

    def shown(self, session_id: str) -> dict[str, Any]:
        return self.gw.session(session_id)

    def entries(self, session_id: str) -> list[dict[bytes, bytes]]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return [fields for _, fields in client.xrange(redis_keys.journal(session_id))]
        finally:
            client.close()

    def settled(self, session_id: str) -> dict[bytes, bytes]:
        """The journal entry that closed the session's last request (stream or error)."""
        return [e for e in self.entries(session_id) if e[b"kind"] in (b"stream", b"response", b"error")][-1]


def env_settings(fake: FakeUpstream, **overrides: Any) -> Settings:
    """The test settings plus the fake upstream as provider `fake` and model `fake-chat`."""
    base = make_settings()
    return make_settings(
        providers=[*base.providers, ProviderSettings(name="fake", kind="openai", api_base=fake.base_url)],
        models=[
            *base.models,
            ModelSettings(name="mock-nousage", provider="mock", price=PRICE, encoding=ENCODING),
            ModelSettings(name="fake-chat", provider="fake", price=PRICE, encoding=ENCODING),
        ],
        **overrides,
    )


@pytest.fixture
async def env(redis_url: str, keyring: Keyring) -> AsyncIterator[Env]:
    async with FakeUpstream() as fake:
        gw = start_gateway(env_settings(fake), redis_url, keyring)
        try:
            yield Env(gw, fake, redis_url)
        finally:
            await asyncio.to_thread(gw.close)


async def stream(gw: Gateway, token: str, model: str, *, include_usage: bool | None) -> tuple[list[dict[str, Any]], list[str]]:
    """POST a streamed chat; returns the data chunks and the SSE comment lines."""
    body: dict[str, Any] = {"model": model, "messages": HELLO, "stream": True}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    chunks: list[dict[str, Any]] = []
    comments: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", gw.openai_base + "/chat/completions", json=body, headers=bearer(token)) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(orjson.loads(line[6:]))
                elif line.startswith(":"):
                    comments.append(line)
    return chunks, comments


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))


def usd_nanos(value: str) -> int:
    return int(Decimal(value) * NANOS_PER_USD)


async def test_the_upstream_usage_chunk_is_what_a_stream_costs(env: Env) -> None:
    opened = env.session()
    chunks, comments = await stream(env.gw, opened["token"], "gpt-4o-mini", include_usage=True)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] > 0
    # The mock's own accounting of the same request, as a plain call.
    upstream = {"model": "gpt-4o-mini-2024-07-18", "messages": HELLO, "max_tokens": 256}
    assert usage["prompt_tokens"] == chat_completion(upstream)["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == chat_completion(upstream)["usage"]["completion_tokens"]
    assert text_of(chunks) == answer_text(upstream)

    expected = cost_nanos(usage["prompt_tokens"], 150_000_000) + cost_nanos(usage["completion_tokens"], 600_000_000)
    shown = env.shown(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"]) == (expected, 0)
    assert comments == [f": abc-cost-usd {Decimal(expected) / NANOS_PER_USD:.9f}"]
    entry = env.settled(opened["session_id"])
    assert (entry[b"kind"], entry[b"usage_from"], int(entry[b"cost_nanos"])) == (b"stream", b"upstream", expected)


@pytest.mark.parametrize("include_usage", [None, False])
async def test_the_usage_chunk_is_asked_for_but_hidden_when_the_client_did_not_ask(env: Env, include_usage: bool | None) -> None:
    opened = env.session()
    chunks, _ = await stream(env.gw, opened["token"], "gpt-4o-mini", include_usage=include_usage)
    assert all(c["choices"] for c in chunks)
    assert not any("usage" in c for c in chunks)
    entry = env.settled(opened["session_id"])
    assert entry[b"usage_from"] == b"upstream"  # the gateway still billed from the upstream's numbers
    upstream = {"model": "gpt-4o-mini-2024-07-18", "messages": HELLO, "max_tokens": 256}
    usage = chat_completion(upstream)["usage"]
    assert (int(entry[b"tok_in"]), int(entry[b"tok_out"])) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert env.shown(opened["session_id"])["spent_nanos"] == int(entry[b"cost_nanos"]) > 0


async def test_a_stream_without_usage_is_charged_by_counting_its_text(env: Env) -> None:
    opened = env.session()
    chunks, comments = await stream(env.gw, opened["token"], "mock-nousage", include_usage=True)
    assert not any(c.get("usage") for c in chunks)  # the upstream never sent one
    text = text_of(chunks)
    assert text == answer_text({"model": "mock-nousage", "messages": HELLO})
    prompt = count_chat_prompt(HELLO, ENCODING)
    completion = count_text(text, ENCODING)
    # Counting recovers exactly what the upstream generated.
    assert completion == chat_completion({"model": "mock-nousage", "messages": HELLO})["usage"]["completion_tokens"]
    expected = cost_nanos(prompt, IN_NANOS) + cost_nanos(completion, OUT_NANOS)
    shown = env.shown(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"]) == (expected, 0)
    assert usd_nanos(comments[0].removeprefix(": abc-cost-usd ")) == expected
    entry = env.settled(opened["session_id"])
    assert (entry[b"usage_from"], int(entry[b"tok_in"]), int(entry[b"tok_out"])) == (b"counted", prompt, completion)


def fake_chunks(answer: str) -> list[dict[str, Any]]:
    """The mock's answer, as an OpenAI upstream streams it: role, one token per chunk, finish."""
    head = {"id": "chatcmpl-cut", "object": "chat.completion.chunk", "created": 1, "model": "fake-chat"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    return [chunk({"role": "assistant", "content": ""}), *(chunk({"content": p}) for p in text_pieces(answer, ENCODING)), chunk({}, "stop")]


async def test_a_client_disconnect_mid_stream_is_charged_exactly_what_was_generated(env: Env) -> None:
    answer = answer_text({"model": "mock-nousage", "messages": HELLO})
    full = count_text(answer, ENCODING)
    env.fake.stream_with(fake_chunks(answer), delay_s=0.05)
    opened = env.session()
    body = {"model": "fake-chat", "messages": HELLO, "stream": True}
    received: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", env.gw.openai_base + "/chat/completions", json=body, headers=bearer(opened["token"])) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    piece = orjson.loads(line[6:])["choices"][0]["delta"].get("content")
                    if piece:
                        received.append(piece)
                if len(received) == 3:
                    break  # hang up mid-stream

    assert await env.fake.wait_disconnect(5), "the upstream call was not cancelled"
    deadline = asyncio.get_running_loop().time() + 5
    while env.shown(opened["session_id"])["reserved_nanos"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    entry = env.settled(opened["session_id"])
    assert (entry[b"kind"], entry[b"code"], entry[b"status"]) == (b"error", b"client_disconnected", b"499")

    # What the gateway relayed before it noticed: a prefix of the answer, at least what we read.
    relayed = "".join(
        orjson.loads(line)["choices"][0]["delta"].get("content") or ""
        for line in (entry_body(entry) or b"").split(b"\n") if line
    )
    assert answer.startswith(relayed) and relayed.startswith("".join(received))
    tok_out = int(entry[b"tok_out"])
    assert tok_out == count_text(relayed, ENCODING)
    assert len(received) <= tok_out < full
    assert int(entry[b"tok_in"]) == count_chat_prompt(HELLO, ENCODING)

    shown = env.shown(opened["session_id"])
    expected = cost_nanos(count_chat_prompt(HELLO, ENCODING), IN_NANOS) + cost_nanos(tok_out, OUT_NANOS)
    assert (shown["spent_nanos"], shown["reserved_nanos"], int(entry[b"cost_nanos"])) == (expected, 0, expected)
    print(f"\ndisconnect: client read {len(received)} tokens, gateway relayed {tok_out} of {full}, charged {expected} nanos")


async def test_a_client_gone_before_the_first_chunk_is_settled_not_left_to_the_reaper(env: Env) -> None:
    """Hanging up while the upstream is still thinking: the request is settled at once for
    its prompt (nothing was generated yet), not left for the reaper to charge in full."""
    answer = answer_text({"model": "mock-nousage", "messages": HELLO})
    env.fake.stream_with(fake_chunks(answer), delay_s=0.4)
    opened = env.session()
    body = {"model": "fake-chat", "messages": HELLO, "stream": True}
    async with httpx.AsyncClient(timeout=30) as client:
        with pytest.raises(httpx.TimeoutException):
            await client.post(env.gw.openai_base + "/chat/completions", json=body, headers=bearer(opened["token"]), timeout=0.15)
    assert await env.fake.wait_disconnect(5), "the upstream call was not cancelled"
    deadline = asyncio.get_running_loop().time() + 5
    while env.shown(opened["session_id"])["reserved_nanos"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    entry = env.settled(opened["session_id"])
    assert (entry[b"kind"], entry[b"code"], entry[b"tok_out"]) == (b"error", b"client_disconnected", b"0")
    prompt_cost = cost_nanos(count_chat_prompt(HELLO, ENCODING), IN_NANOS)
    shown = env.shown(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"]) == (prompt_cost, 0)
