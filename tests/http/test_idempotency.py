"""Idempotency-Key: a retry in the same session gets the first answer byte for byte, with
its headers, from one upstream call and one charge; concurrent duplicates wait for it, for
a while, then get 409 with Retry-After. (A retry after the first's process died takes the
request over: tests/e2e/test_crash.py and tests/unit/test_leases.py.)

The fake upstream runs on the test's event loop and the gateway on its own thread, so the
calls are made with httpx.AsyncClient.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway import redis_keys
from gateway.capability import Keyring
from gateway.settings import BudgetSettings, ModelSettings, Price, ProviderSettings, load_settings
from tests.conftest import BOTH_REDIS, ROOT, Gateway, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream
from tests.openai_support import assert_no_server_errors
from tests.redis_proc import client_for

pytestmark = BOTH_REDIS  # each test runs on a single Redis and on a Redis Cluster

PLAN: dict[str, Any] = {"name": "idem", "tenant": "acme", "models": [{"name": "up-model", "max_tokens": 50}], "budget": {"usd": 5}}
ASK = {"model": "up-model", "messages": [{"role": "user", "content": "count the apples please"}]}
STREAM_ASK = {**ASK, "stream": True}
KEPT_HEADERS = ("x-request-id", "x-abc-cost-usd", "x-abc-budget-remaining-usd", "x-abc-session", "content-type")


@dataclass
class Setup:
    fake: FakeUpstream
    gw: Gateway
    redis_url: str

    def session(self) -> tuple[str, httpx.AsyncClient]:
        opened = self.gw.open_session(PLAN)
        client = httpx.AsyncClient(base_url=self.gw.openai_base, headers={"Authorization": f"Bearer {opened['token']}"}, timeout=30)
        return opened["session_id"], client

    def spent_nanos(self, session_id: str) -> int:
        spent: int = self.gw.session(session_id)["spent_nanos"]
        return spent


WAIT_S = 2.0  # how long a duplicate waits for a live first before 409


@pytest.fixture
async def setup(redis_url: str, keyring: Keyring) -> AsyncIterator[Setup]:
    async with FakeUpstream() as fake:
        base = load_settings(ROOT / "config" / "gateway.yaml")
        settings = make_settings(
            providers=[*base.providers, ProviderSettings(name="up", kind="openai", api_base=fake.base_url)],
            models=[*base.models, ModelSettings(name="up-model", provider="up", price=Price(input_per_mtok=1.0, output_per_mtok=2.0))],
            budget=BudgetSettings(idempotency_wait_s=WAIT_S),
        )
        gw = start_gateway(settings, redis_url, keyring)
        try:
            yield Setup(fake, gw, redis_url)
            assert_no_server_errors(gw)
        finally:
            gw.close()


def _kinds(redis_url: str, session_id: str) -> list[str]:
    client = client_for(redis_url)
    try:
        return [fields[b"kind"].decode() for _, fields in client.xrange(redis_keys.journal(session_id))]
    finally:
        client.close()


async def test_a_retry_gets_the_first_answer_byte_for_byte_and_one_charge(setup: Setup) -> None:
    session_id, client = setup.session()
    async with client:
        first = await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "order-1"})
        spent = setup.spent_nanos(session_id)
        retry = await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == retry.status_code == 200
    assert retry.content == first.content
    for name in KEPT_HEADERS:
        assert retry.headers[name] == first.headers[name], name
    assert retry.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert len(setup.fake.requests) == 1
    assert spent > 0 and setup.spent_nanos(session_id) == spent
    assert _kinds(setup.redis_url, session_id) == ["state", "request", "response"]


async def test_concurrent_duplicates_wait_for_the_first_instead_of_calling_upstream(setup: Setup) -> None:
    setup.fake.respond_with(json=_completion(), delay_s=0.4)
    session_id, client = setup.session()
    async with client:
        answers = await asyncio.gather(*[
            client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "dup"}) for _ in range(6)
        ])
    assert [a.status_code for a in answers] == [200] * 6
    assert len({a.content for a in answers}) == 1
    assert len({a.headers["x-request-id"] for a in answers}) == 1
    assert sum("idempotent-replayed" in a.headers for a in answers) == 5
    assert len(setup.fake.requests) == 1
    assert _kinds(setup.redis_url, session_id) == ["state", "request", "response"]
    assert setup.spent_nanos(session_id) == 1000 * 5 + 2000 * 7  # the scripted usage, once


async def test_a_duplicate_of_a_first_still_working_gets_409_with_retry_after_then_the_answer(setup: Setup) -> None:
    setup.fake.respond_with(json=_completion(), delay_s=WAIT_S + 1.0)
    session_id, client = setup.session()
    async with client:
        first = asyncio.ensure_future(client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "long"}))
        await asyncio.sleep(0.2)
        busy = await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "long"})
        assert not first.done()
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_key_in_use"
        assert busy.headers["retry-after"] == "1"
        answered = await first
        retry = await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "long"})
    assert answered.status_code == retry.status_code == 200 and retry.content == answered.content
    assert len(setup.fake.requests) == 1
    assert _kinds(setup.redis_url, session_id) == ["state", "request", "response"]


async def test_a_streamed_answer_is_replayed_as_the_same_bytes(setup: Setup) -> None:
    session_id, client = setup.session()
    async with client:
        first, *duplicates = await asyncio.gather(*[
            client.post("/chat/completions", json=STREAM_ASK, headers={"Idempotency-Key": "s-1"}) for _ in range(3)
        ])
        retry = await client.post("/chat/completions", json=STREAM_ASK, headers={"Idempotency-Key": "s-1"})
    assert first.text.startswith("data: {") and first.text.endswith("data: [DONE]\n\n")
    assert ": abc-cost-usd " in first.text
    for other in [*duplicates, retry]:
        assert other.status_code == 200 and other.content == first.content
        assert other.headers["content-type"].startswith("text/event-stream")
        assert other.headers["x-request-id"] == first.headers["x-request-id"]
    assert len(setup.fake.requests) == 1
    assert _kinds(setup.redis_url, session_id) == ["state", "request", "stream"]


async def test_the_same_key_with_another_body_is_422_and_costs_nothing(setup: Setup) -> None:
    session_id, client = setup.session()
    async with client:
        await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "k"})
        spent = setup.spent_nanos(session_id)
        other = await client.post(
            "/chat/completions", json={**ASK, "messages": [{"role": "user", "content": "pears"}]}, headers={"Idempotency-Key": "k"}
        )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert len(setup.fake.requests) == 1 and setup.spent_nanos(session_id) == spent
    assert _kinds(setup.redis_url, session_id) == ["state", "request", "response"]


async def test_a_failed_first_request_frees_its_key_so_the_retry_runs(setup: Setup) -> None:
    setup.fake.respond_with(status=500, json={"error": {"message": "boom", "type": "server_error"}})
    session_id, client = setup.session()
    async with client:
        failed = await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "again"})
        retry = await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "again"})
        replayed = await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "again"})
    assert failed.status_code == 502 and retry.status_code == 200
    assert replayed.content == retry.content and replayed.headers["idempotent-replayed"] == "true"
    assert len(setup.fake.requests) == 2
    assert _kinds(setup.redis_url, session_id) == ["state", "request", "error", "request", "response"]


async def test_keys_belong_to_one_session_and_requests_without_one_always_run(setup: Setup) -> None:
    _, one = setup.session()
    _, two = setup.session()
    async with one, two:
        await one.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "shared"})
        await two.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "shared"})
        await one.post("/chat/completions", json=ASK)
        await one.post("/chat/completions", json=ASK)
        bad = await one.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "x" * 300})
    assert len(setup.fake.requests) == 4
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"


async def test_the_record_is_kept_under_a_hash_of_the_key(setup: Setup) -> None:
    session_id, client = setup.session()
    async with client:
        await client.post("/chat/completions", json=ASK, headers={"Idempotency-Key": "secret-ish-key"})
    raw = client_for(setup.redis_url)
    try:
        names = [k.decode() for k in raw.scan_iter(match="idem:*")]
        assert len(names) == 1 and names[0].startswith(redis_keys.idempotency(session_id, ""))
        assert "secret-ish-key" not in names[0]
        assert raw.hget(names[0], "state") == b"done" and 0 < raw.ttl(names[0]) <= 24 * 3600
    finally:
        raw.close()


def _completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1_700_000_000, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "seven apples"}, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
