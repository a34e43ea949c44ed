"""Limits at the edge of a real gateway: the open-connection cap, compressed bodies refused
without being inflated, and a stream whose client stops reading is cut and charged."""

from __future__ import annotations

import asyncio
import functools
import gzip
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from gateway import redis_keys
from gateway.capability import Keyring
from gateway.settings import ModelSettings, Price, ProviderSettings, ServerSettings
from tests.conftest import OPEN_PLAN, Gateway, make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream

HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


def server_settings(**limits: Any) -> ServerSettings:
    return make_settings().server.model_copy(update=limits)


@pytest.fixture
def capped(redis_url: str, keyring: Keyring) -> Iterator[Gateway]:
    gw = start_gateway(make_settings(server=server_settings(max_connections=4, retry_after_s=3)), redis_url, keyring)
    yield gw
    gw.close()


def connect(gw: Gateway) -> socket.socket:
    return socket.create_connection((gw.server.host, gw.server.port), timeout=10)


def test_a_connection_past_the_cap_gets_a_503_with_retry_after_and_the_cap_frees_up(capped: Gateway) -> None:
    idle = [connect(capped) for _ in range(4)]
    time.sleep(0.2)  # let the server accept them
    extra = connect(capped)
    answer = extra.recv(4096)
    extra.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 3" in head
    assert orjson.loads(body)["error"]["code"] == "overloaded"
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 5
    while True:  # the server notices the closed sockets, then serves again
        response = httpx.get(capped.base_url + "/healthz", timeout=5)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status_code == 200


@functools.cache
def bomb() -> bytes:
    return gzip.compress(b'{"model": "gpt-4o-mini", "messages": [' + b" " * 20_000_000 + b"]}", 1)  # 20 MB in ~90 kB


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZip"])
def test_a_compressed_body_is_refused_with_415_and_never_inflated(gw: Gateway, encoding: str) -> None:
    token = gw.token(OPEN_PLAN)
    response = httpx.post(gw.openai_base + "/chat/completions", content=bomb(), timeout=30, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json", "Content-Encoding": encoding})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_content_encoding"
    plain = httpx.post(gw.openai_base + "/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {token}", "Content-Encoding": "identity"})
    assert plain.status_code == 200


@pytest.fixture
async def stalled(redis_url: str, keyring: Keyring) -> Any:
    async with FakeUpstream() as fake:
        base = make_settings()
        settings = make_settings(
            server=server_settings(stream_write_timeout_s=0.5),
            providers=[*base.providers, ProviderSettings(name="fake", kind="openai", api_base=fake.base_url)],
            models=[*base.models, ModelSettings(name="fake-chat", provider="fake", price=Price(input_per_mtok=1, output_per_mtok=2))],
        )
        gw = start_gateway(settings, redis_url, keyring)
        try:
            yield gw, fake
        finally:
            await asyncio.to_thread(gw.close)


async def test_a_stream_whose_client_stops_reading_is_cut_after_the_write_timeout(stalled: Any, redis_url: str) -> None:
    gw, fake = stalled
    plan = {**OPEN_PLAN, "models": [{"name": "fake-chat", "max_tokens": 256}]}
    opened = await asyncio.to_thread(gw.open_session, plan)
    words = "word " * 2000  # 10 kB a chunk, 2000 chunks: far more than the socket buffers hold
    fake.stream_with([{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "f",
                       "choices": [{"index": 0, "delta": {"content": words}, "finish_reason": None}]}] * 2000)
    body = orjson.dumps({"model": "fake-chat", "stream": True, "messages": [{"role": "user", "content": "go"}]})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((gw.server.host, gw.server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + opened["token"].encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    try:
        client = redis.Redis.from_url(redis_url)
        key = redis_keys.journal(opened["session_id"])
        deadline = time.monotonic() + 20
        kinds: list[bytes] = []
        while time.monotonic() < deadline:  # never reading; the gateway gives up on its own
            entries = [fields for _, fields in client.xrange(key)]
            kinds = [e[b"kind"] for e in entries]
            if b"error" in kinds:
                break
            await asyncio.sleep(0.1)
        client.close()
    finally:
        sock.close()
    assert kinds[-1] == b"error", kinds
    assert entries[-1][b"code"] == b"client_disconnected"
    assert int(entries[-1][b"tok_out"]) > 0  # charged for what was generated
    shown = await asyncio.to_thread(gw.session, opened["session_id"])
    assert shown["reserved_nanos"] == 0 and shown["spent_nanos"] > 0
