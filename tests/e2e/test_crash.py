"""A gateway process killed with SIGKILL under load loses nothing the journal promises.

Over many rounds a real `abc-gateway serve` subprocess takes concurrent calls (plain and
streamed) to a slow fake upstream and is killed at a random moment. Afterwards, and after
the reaper has run:
- every answer a client received whole is in the journal, under its x-request-id;
- every request the upstream received has a `request` entry (the gateway journals first);
- every `request` entry ends with exactly one response, stream, error or `aborted` entry;
- the journaled spend equals the session's spend counter, and nothing stays reserved;
- the chain verifies.

And when the killed calls carry Idempotency-Keys, their clients' retries (same keys) are
answered within seconds of the restart, each key charged once: a retry takes over an
attempt whose process stopped renewing its lease instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from aiohttp import web
from redis.asyncio import Redis

from gateway import redis_keys
from gateway.journal.recorded import verify_session
from gateway.state.ledger import Ledger
from gateway.state.reaper import reap_due
from tests.conftest import ADMIN_TOKEN, ROOT, SIGNING_SECRET
from tests.fakes.upstream import FakeUpstream, StreamAnswer, default_answer
from tests.redis_proc import free_port

ROUNDS = 20
WORKERS = 6
UPSTREAM_DELAY_S = 0.06
PLAN = {"name": "crash", "tenant": "acme", "models": [{"name": "slow-up", "max_tokens": 40}], "budget": {"usd": 100}}
TERMINAL = {b"response", b"stream", b"error", b"aborted"}


class SlowUpstream(FakeUpstream):
    """The fake's echo answers, slowed down, noting each X-Request-Id the moment it arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[str] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.received.append(request.headers.get("X-Request-Id", "<none>"))
        answer = default_answer(request, orjson.loads(raw))
        if isinstance(answer, StreamAnswer):
            per_chunk = UPSTREAM_DELAY_S / max(len(answer.chunks), 1)
            return await self._stream(request, replace(answer, delay_s=per_chunk))
        await asyncio.sleep(UPSTREAM_DELAY_S)
        return web.Response(status=answer.status, body=orjson.dumps(answer.json), content_type="application/json")


@dataclass
class Load:
    """What the clients saw: ids sent, and answers received whole (id -> journal kind expected)."""

    sent: list[str] = field(default_factory=list)
    whole: dict[str, str] = field(default_factory=dict)


def _write_config(path: Path, upstream: str, port: int) -> Path:
    config = {
        "providers": [{"name": "up", "kind": "openai", "api_base": upstream}],
        "models": [{"name": "slow-up", "provider": "up", "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}],
        "server": {"host": "127.0.0.1", "port": port},
        "log": {"level": "error"},  # its stderr is a pipe nobody reads while it runs
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _executable() -> list[str]:
    script = Path(sys.executable).parent / "abc-gateway"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]


async def _start_gateway(config: Path, redis_url: str, port: int) -> asyncio.subprocess.Process:
    env = {**os.environ, "ABC_REDIS_URL": redis_url, "ABC_ADMIN_TOKEN": ADMIN_TOKEN,
           "ABC_SIGNING_KEY": SIGNING_SECRET, "ABC_CONFIG": str(config)}
    # Its log goes to a file: a pipe nobody reads fills up and stalls the gateway.
    log = config.with_suffix(".log")
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *_executable(), "serve", cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError("gateway exited: " + log.read_text(errors="replace")[-4000:])
            try:
                if (await client.get(f"http://127.0.0.1:{port}/healthz", timeout=1)).status_code == 200:
                    return process
            except httpx.TransportError:
                await asyncio.sleep(0.03)
    process.kill()
    await process.wait()
    raise RuntimeError("gateway did not start")


async def _worker(client: httpx.AsyncClient, load: Load, round_no: int, worker: int, rng: random.Random) -> None:
    n = 0
    while True:
        n += 1
        rid = f"crash-{round_no}-{worker}-{n}"
        stream = rng.random() < 0.5
        body = {"model": "slow-up", "messages": [{"role": "user", "content": f"count to {n} please"}], "stream": stream}
        load.sent.append(rid)
        try:
            if stream:
                async with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-request-id": rid}) as response:
                    text = (await response.aread()).decode()
                if response.status_code == 200 and text.endswith("data: [DONE]\n\n") and '{"error"' not in text:
                    load.whole[rid] = "stream"
            else:
                response = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": rid})
                if response.status_code == 200:
                    response.json()  # whole and parseable
                    load.whole[rid] = "response"
            assert response.headers["x-request-id"] == rid
        except (httpx.TransportError, ValueError):
            return  # the gateway died under us


async def _round(round_no: int, config: Path, port: int, redis_url: str, token: str, load: Load, rng: random.Random) -> None:
    process = await _start_gateway(config, redis_url, port)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as client:
        workers = [asyncio.create_task(_worker(client, load, round_no, w, rng)) for w in range(WORKERS)]
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        process.send_signal(signal.SIGKILL)
        await process.wait()
        await asyncio.wait(workers, timeout=10)
    for task in workers:
        task.cancel()


@pytest.mark.timeout(300)  # rounds of kill and restart: ~105 s on an idle machine, far more on a crowded one
async def test_sigkill_under_load_loses_nothing_the_journal_promises(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="aiohttp.server")  # the fake's writes to killed peers
    rng = random.Random(os.environ.get("CRASH_SEED", "abc"))
    load = Load()
    redis = Redis.from_url(redis_url)
    async with SlowUpstream() as upstream:
        port = free_port()
        config = _write_config(tmp_path / "gateway.yaml", upstream.base_url, port)
        session_id, token = await _open_session(config, redis_url, port)
        for round_no in range(ROUNDS):
            await _round(round_no, config, port, redis_url, token, load, rng)
        received = list(upstream.received)

    ledger = Ledger(redis, reservation_ttl_s=900, journal_retention_s=3600)
    while await reap_due(redis, ledger, now=time.time() + 10_000):
        pass
    entries = [(i, f) for i, f in await redis.xrange(redis_keys.journal(session_id))]
    by_rid: dict[str, list[bytes]] = {}
    for _, fields in entries:
        if b"rid" in fields:
            by_rid.setdefault(fields[b"rid"].decode(), []).append(fields[b"kind"])

    kinds = Counter(f[b"kind"] for _, f in entries)
    assert len(load.whole) > ROUNDS and kinds[b"aborted"] > 0, (len(load.whole), kinds)  # the test did bite
    for rid, kind in load.whole.items():
        assert kind.encode() in by_rid.get(rid, []), (rid, by_rid.get(rid))
    for rid in received:
        assert by_rid.get(rid, [])[:1] == [b"request"], (rid, by_rid.get(rid))
    for rid, seen in by_rid.items():
        assert seen[0] == b"request" and len(seen) == 2 and seen[1] in TERMINAL, (rid, seen)

    session = {k.decode(): v.decode() for k, v in (await redis.hgetall(redis_keys.session(session_id))).items()}
    journaled = sum(int(f.get(b"cost_nanos", 0)) for _, f in entries if f[b"kind"] in TERMINAL)
    assert journaled == int(session["spent_nanos"]) > 0
    assert int(session["reserved_nanos"]) == 0
    # What is left are closed reservations, kept so a late settle could still correct them:
    # "Z..." closed at nothing once their process's lease ran out, "R..." charged in full.
    assert all(r.startswith((b"R", b"Z")) for r in (await redis.hgetall(redis_keys.reservations(session_id))).values())
    assert (await verify_session(redis, session_id)).ok
    await redis.aclose()


async def _open_session(config: Path, redis_url: str, port: int, plan: dict[str, Any] = PLAN) -> tuple[str, str]:
    process = await _start_gateway(config, redis_url, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            compiled = await admin.post("/admin/v1/plans/compile", json=plan)
            assert compiled.status_code == 201, compiled.text
            opened = (await admin.post("/admin/v1/sessions", json={"assembly_id": compiled.json()["assembly_id"]})).json()
    finally:
        process.terminate()
        await process.wait()
    data: dict[str, Any] = opened
    return data["session_id"], data["token"]


# A crash under keyed requests, and the clients' retries with the same Idempotency-Keys.
KEYED_IN_FLIGHT = 32
CRASHES = 10
SLOW_S = 1.0  # how long the mock's slow model takes: long enough to be killed in flight
ANSWER_WITHIN_S = 10.0
KEYED_PLAN = {"name": "crash-retry", "tenant": "acme", "models": [{"name": "mock-slow", "max_tokens": 40}], "budget": {"usd": 100}}


def _write_mock_config(path: Path, port: int) -> Path:
    config = {
        "providers": [{"name": "mock", "kind": "mock", "slow_delay_s": SLOW_S}],
        "models": [{"name": "mock-slow", "provider": "mock", "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}],
        "server": {"host": "127.0.0.1", "port": port},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Keyed:
    """One client with one Idempotency-Key, retrying until it has the answer whole."""

    key: str
    stream: bool
    attempts: int = 0
    answer: bytes = b""
    answered_by: str = ""  # x-request-id of the answer: the attempt that produced it
    answered_at: float = 0.0

    async def until_answered(self, client: httpx.AsyncClient) -> None:
        body = {"model": "mock-slow", "messages": [{"role": "user", "content": f"tell me about {self.key}"}], "stream": self.stream}
        while True:
            self.attempts += 1
            headers = {"Idempotency-Key": self.key, "x-request-id": f"{self.key}-{self.attempts}"}
            try:
                response = await client.post("/v1/chat/completions", json=body, headers=headers)
            except httpx.TransportError:
                await asyncio.sleep(0.05)  # killed under us, or not up again yet
                continue
            whole = not self.stream or (response.text.endswith("data: [DONE]\n\n") and '{"error"' not in response.text)
            if response.status_code == 200 and whole:
                self.answer, self.answered_at = response.content, time.monotonic()
                self.answered_by = response.headers["x-request-id"]
                return
            assert response.status_code in (409, 503), (response.status_code, response.text)
            await asyncio.sleep(float(response.headers.get("retry-after", "0.1")))


class JournalWatch:
    """Reads a session's journal as it grows: who was journaled, and who is still open."""

    def __init__(self, redis: Redis, session_id: str) -> None:
        self.redis, self.key = redis, redis_keys.journal(session_id)
        self.last = b"-"
        self.entries: list[dict[bytes, bytes]] = []

    async def read(self) -> list[dict[bytes, bytes]]:
        for entry_id, fields in await self.redis.xrange(self.key, min=self.last if self.last == b"-" else b"(" + self.last):
            self.entries.append(fields)
            self.last = entry_id
        return self.entries

    async def open_requests(self) -> set[str]:
        opened, closed = set(), set()
        for fields in await self.read():
            if fields[b"kind"] == b"request":
                opened.add(fields[b"rid"].decode())
            elif fields[b"kind"] in TERMINAL:
                closed.add(fields[b"rid"].decode())
        return opened - closed

    async def wait_requests(self, prefix: str, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(f[b"kind"] == b"request" and f[b"rid"].startswith(prefix.encode()) for f in await self.read()) < count:
            assert time.monotonic() < deadline, f"fewer than {count} requests {prefix}* journaled"
            await asyncio.sleep(0.02)


@pytest.mark.timeout(400)  # ten gateway starts: about a minute, far more on a crowded machine
async def test_after_a_crash_keyed_retries_are_answered_in_seconds_and_charged_once(redis_url: str, tmp_path: Path) -> None:
    rng = random.Random(os.environ.get("CRASH_SEED", "keyed"))
    redis = Redis.from_url(redis_url)
    port = free_port()
    config = _write_mock_config(tmp_path / "gateway.yaml", port)
    session_id, token = await _open_session(config, redis_url, port, KEYED_PLAN)
    watch = JournalWatch(redis, session_id)
    everyone: list[Keyed] = []
    waits: list[float] = []
    starts: list[float] = []
    process = await _start_gateway(config, redis_url, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            for crash in range(CRASHES):
                keyed = [Keyed(f"c{crash}k{i}", stream=i % 2 == 1) for i in range(KEYED_IN_FLIGHT)]
                clients = [asyncio.create_task(k.until_answered(client)) for k in keyed]
                await watch.wait_requests(f"c{crash}k", KEYED_IN_FLIGHT, timeout_s=20)
                await asyncio.sleep(rng.uniform(0, 0.2 * SLOW_S))
                process.send_signal(signal.SIGKILL)
                await process.wait()
                killed = time.monotonic()
                process = await _start_gateway(config, redis_url, port)
                restarted = time.monotonic()
                starts.append(restarted - killed)
                done, _ = await asyncio.wait(clients, timeout=ANSWER_WITHIN_S + 20)
                assert len(done) == KEYED_IN_FLIGHT, f"{KEYED_IN_FLIGHT - len(done)} keys got no answer"
                assert not [t.exception() for t in done if t.exception()], [repr(t.exception()) for t in done if t.exception()][:3]
                waits += [k.answered_at - restarted for k in keyed]
                everyone += keyed

            # Every dead attempt is closed (taken over by its retry, or by the reaper) soon.
            deadline = restarted + ANSWER_WITHIN_S
            while (still_open := await watch.open_requests()) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            closed_after = time.monotonic() - restarted
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()

    retried = sum(k.attempts > 1 for k in everyone)
    print(
        f"\ncrash and retry: {CRASHES} kills under {KEYED_IN_FLIGHT} keyed requests; {retried} of {len(everyone)} keys retried;"
        f" restart took median {sorted(starts)[len(starts) // 2]:.1f} s;"
        f" answer after restart: median {sorted(waits)[len(waits) // 2]:.2f} s, max {max(waits):.2f} s;"
        f" {len(still_open)} requests open {closed_after:.1f} s after the last restart"
    )
    assert retried >= CRASHES * KEYED_IN_FLIGHT // 2, retried  # the kills did land on requests in flight
    assert max(waits) < ANSWER_WITHIN_S, sorted(waits)[-5:]
    assert not still_open, sorted(still_open)

    # Each key: one answer, charged once; every other attempt of it closed at nothing.
    terminal: dict[str, list[dict[bytes, bytes]]] = {}
    for fields in watch.entries:
        if fields[b"kind"] in TERMINAL:
            terminal.setdefault(fields[b"rid"].decode().rsplit("-", 1)[0], []).append(fields)
    for k in everyone:
        outcomes = terminal[k.key]
        answers = [f for f in outcomes if f[b"kind"] in (b"response", b"stream")]
        assert [f[b"rid"].decode() for f in answers] == [k.answered_by], (k.key, outcomes)
        assert all(f[b"kind"] == b"aborted" and f[b"cost_nanos"] == b"0" for f in outcomes if f not in answers), (k.key, outcomes)
        assert int(answers[0][b"cost_nanos"]) > 0
    session = {k.decode(): v.decode() for k, v in (await redis.hgetall(redis_keys.session(session_id))).items()}
    journaled = sum(int(f.get(b"cost_nanos", 0)) for f in watch.entries if f[b"kind"] in TERMINAL)
    assert journaled == int(session["spent_nanos"])
    assert int(session["reserved_nanos"]) == 0
    assert (await verify_session(redis, session_id)).ok
    await redis.aclose()
