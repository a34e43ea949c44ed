"""One lifecycle for every call: whatever goes wrong, a call is settled once, at once, for
what it generated, and nothing is left for the reaper unless the process died."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.assembly.model import Assembly
from gateway.capability import Keyring
from gateway.plugins import PluginOptions, Registry, Scratch
from tests.conftest import Gateway, start_gateway
from tests.fakes.upstream import FakeUpstream
from tests.http.test_stream_accounting import HELLO, PLAN, Env, env_settings, fake_chunks
from tests.openai_support import bearer


class ChunkBug:
    """A plugin with a bug: it raises a plain exception on the third streamed chunk."""

    name = "chunk_bug"
    version = "0.0.1"
    Options = PluginOptions

    def __init__(self, options: PluginOptions, assembly: Assembly) -> None:
        pass

    def on_request(self, body: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        return None

    def on_chunk(self, chunk: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        scratch.data["seen"] = scratch.data.get("seen", 0) + 1
        if scratch.data["seen"] == 3:
            raise KeyError("plugin bug")
        return None

    def on_stream_end(self, last: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        return None

    def on_response(self, data: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        return None


async def _env(redis_url: str, keyring: Keyring) -> AsyncIterator[Env]:
    async with FakeUpstream() as fake:
        registry = Registry.from_entry_points().adding(ChunkBug)
        gw = start_gateway(env_settings(fake), redis_url, keyring, plugins=registry)
        try:
            yield Env(gw, fake, redis_url)
        finally:
            await asyncio.to_thread(gw.close)


@pytest.fixture
async def env(redis_url: str, keyring: Keyring) -> AsyncIterator[Env]:
    async for made in _env(redis_url, keyring):
        yield made


@pytest.fixture
async def buggy(redis_url: str, keyring: Keyring) -> AsyncIterator[Env]:
    async for made in _env(redis_url, keyring):
        yield made


async def _post(gw: Gateway, token: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(gw.openai_base + "/chat/completions", json=body, headers=bearer(token))


async def test_a_malformed_upstream_answer_is_a_502_and_its_reservation_is_released_at_once(env: Env) -> None:
    env.fake.respond_with(json={"choices": [{"message": "x"}]})
    opened = env.session()
    response = await _post(env.gw, opened["token"], {"model": "fake-chat", "messages": HELLO})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_error"
    # Read right after the answer: no waiting for the reaper, which would charge it in full.
    shown = env.shown(opened["session_id"])
    assert (shown["reserved_nanos"], shown["spent_nanos"]) == (0, 0)
    last = env.settled(opened["session_id"])
    assert (last[b"kind"], last[b"status"]) == (b"error", b"502")


async def test_a_plugin_that_raises_mid_stream_is_settled_with_the_chunks_sent(buggy: Env) -> None:
    answer = "one two three four five six seven eight"
    buggy.fake.stream_with(fake_chunks(answer))
    opened = await asyncio.to_thread(buggy.gw.open_session, {**PLAN, "name": "buggy", "plugins": [{"name": "chunk_bug"}]})
    body = {"model": "fake-chat", "messages": HELLO, "stream": True}
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", buggy.gw.openai_base + "/chat/completions", json=body, headers=bearer(opened["token"])) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    # Two chunks went out, then an error event (no exception text) and [DONE].
    assert len(lines) == 4 and lines[-1] == "data: [DONE]"
    error = orjson.loads(lines[-2][6:])["error"]
    assert error["code"] == "internal_error" and "plugin bug" not in error["message"]
    shown = buggy.shown(opened["session_id"])
    entry = buggy.settled(opened["session_id"])
    assert (entry[b"kind"], entry[b"status"], entry[b"code"]) == (b"error", b"500", b"internal_error")
    assert len((entry.get(b"body") or b"").split(b"\n")) == 2  # the chunks the client got
    assert shown["reserved_nanos"] == 0
    assert shown["spent_nanos"] == int(entry[b"cost_nanos"]) > 0  # the prompt and what was generated


async def test_a_live_replayed_stream_is_cut_by_the_same_plugins(env: Env) -> None:
    """The plugins are the Assembly's, so a live replay runs them too: an answer that fitted
    when recorded and comes back too long this time is cut, as it would be in the session."""
    env.fake.stream_with(fake_chunks("a short answer"))
    source = await asyncio.to_thread(env.gw.open_session, {
        **PLAN, "name": "guarded-streams", "plugins": [{"name": "output_limits", "options": {"max_chars": 40}}],
    })
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", env.gw.openai_base + "/chat/completions", headers=bearer(source["token"]),
                                 json={"model": "fake-chat", "messages": HELLO, "stream": True}) as r:
            assert r.status_code == 200
            _ = [line async for line in r.aiter_lines()]
    env.fake.stream_with(fake_chunks("a long answer " * 20))
    replay = await asyncio.to_thread(
        env.gw.admin.post, f"/admin/v1/sessions/{source['session_id']}/replay", json={"mode": "live"},
    )
    assert replay.status_code == 200, replay.text
    (result,) = replay.json()["results"]
    assert result["answer"] == "error" and result["error"]["code"] == "plugin_denied"
    assert result["match"] is False
    live = env.shown(replay.json()["session_id"])
    assert live["reserved_nanos"] == 0 and live["spent_nanos"] > 0


async def test_clients_that_hang_up_leave_no_traceback(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    answer = "word " * 40
    hangups = 20
    env.fake.stream_with(fake_chunks(answer), delay_s=0.02, times=hangups)
    opened = env.session()
    body = {"model": "fake-chat", "messages": HELLO, "stream": True}

    async def hang_up() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", env.gw.openai_base + "/chat/completions", json=body, headers=bearer(opened["token"])) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break

    await asyncio.gather(*(hang_up() for _ in range(hangups)))
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        closed = [e for e in env.entries(opened["session_id"]) if e[b"kind"] == b"error"]
        if len(closed) == hangups:
            break
        await asyncio.sleep(0.1)
    assert [e[b"code"] for e in closed] == [b"client_disconnected"] * hangups
    assert env.shown(opened["session_id"])["reserved_nanos"] == 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert sum("client hung up" in r.getMessage() for r in caplog.records) == hangups


async def test_a_body_refused_before_parsing_is_journaled_as_a_denial(env: Env) -> None:
    opened = env.session()
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            env.gw.openai_base + "/chat/completions", content=b'{"model": "fake-chat", "messages": [',
            headers={**bearer(opened["token"]), "Content-Type": "application/json"},
        )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    denial = env.entries(opened["session_id"])[-1]
    assert (denial[b"kind"], denial[b"status"], denial[b"code"]) == (b"denial", b"400", b"invalid_json")
    assert env.fake.requests == [] and env.shown(opened["session_id"])["reserved_nanos"] == 0
    env.gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/revoke")
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(env.gw.openai_base + "/chat/completions", content=b"not json", headers=bearer(opened["token"]))
    assert response.status_code == 401  # a dead session is a 401 before anything else
