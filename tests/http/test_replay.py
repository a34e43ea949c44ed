"""Replays: a recorded replay answers every call from the source journal byte for byte
(streams re-chunked the same way) and a changed request diverges with 409; a live replay
re-executes the calls and says per call whether the answers match; the CLI drives both."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import httpx
import pytest

from gateway import redis_keys
from gateway.state.entries import entry_body
from tests.conftest import ADMIN_TOKEN, BOTH_REDIS, OPEN_PLAN, ROOT, Gateway
from tests.redis_proc import client_for

pytestmark = BOTH_REDIS  # each test runs on a single Redis and on a Redis Cluster

TOOLS = [{"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order by id",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}}]
QUESTION = [{"role": "user", "content": "My order A-1234 has not arrived. Can you check it?"}]
TOOL_TURN = [
    *QUESTION,
    {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A-1234"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
]

# A session that used tools and streaming, plus errors, a cut stream and a denial.
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/chat/completions", {"model": "gpt-4o-mini", "messages": QUESTION}),
    ("/chat/completions", {"model": "gpt-4o-mini", "messages": QUESTION, "tools": TOOLS, "stream": True}),
    ("/chat/completions", {"model": "gpt-4o-mini", "messages": QUESTION, "tools": TOOLS}),
    ("/chat/completions", {"model": "gpt-4o-mini", "messages": TOOL_TURN, "tools": TOOLS, "stream": True,
                           "stream_options": {"include_usage": True}}),
    ("/chat/completions", {"model": "gpt-4o", "messages": TOOL_TURN, "tools": TOOLS, "stream": True}),
    ("/chat/completions", {"model": "not-allowed", "messages": QUESTION}),
    ("/chat/completions", {"model": "mock-error", "messages": QUESTION}),
    ("/chat/completions", {"model": "mock-cut", "messages": QUESTION, "stream": True}),
    ("/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello", "stream": True}),
    ("/embeddings", {"model": "text-embedding-3-small", "input": ["one", "two"]}),
    ("/chat/completions", {"model": "gpt-4o-mini", "messages": QUESTION, "n": 2}),
]


def _client(gw: Gateway, token: str) -> httpx.Client:
    return httpx.Client(base_url=gw.openai_base, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _record(gw: Gateway) -> tuple[str, list[httpx.Response]]:
    opened = gw.open_session(OPEN_PLAN)
    with _client(gw, opened["token"]) as client:
        answers = [client.post(path, json=body) for path, body in CALLS]
    return opened["session_id"], answers


def _replay(gw: Gateway, source: str, **body: Any) -> httpx.Response:
    return gw.admin.post(f"/admin/v1/sessions/{source}/replay", json=body)


def _kinds(redis_url: str, session_id: str) -> list[str]:
    client = client_for(redis_url)
    try:
        return [f[b"kind"].decode() for _, f in client.xrange(redis_keys.journal(session_id))]
    finally:
        client.close()


def test_a_recorded_replay_reproduces_every_answer_byte_for_byte(gateway: Gateway, redis_url: str) -> None:
    source, recorded = _record(gateway)
    assert [a.status_code for a in recorded] == [200, 200, 200, 200, 200, 404, 502, 200, 200, 200, 200]
    assert "tool_calls" in recorded[1].text and "tool_calls" in recorded[2].text
    assert '"error"' in recorded[7].text  # the cut stream ends with an error event

    opened = _replay(gateway, source, mode="recorded")
    assert opened.status_code == 201, opened.text
    replay = opened.json()
    assert replay["replay_of"] == source and replay["calls"] == len(CALLS) - 1  # the denial was no call
    with _client(gateway, replay["token"]) as client:
        replayed = [client.post(path, json=body) for path, body in CALLS]

    for i, (first, again) in enumerate(zip(recorded, replayed, strict=True)):
        assert again.status_code == first.status_code, i
        assert again.content == first.content, i
        if first.status_code == 200 and "x-abc-cost-usd" in first.headers:
            assert again.headers["x-abc-cost-usd"] == first.headers["x-abc-cost-usd"], i
            assert again.headers["x-abc-budget-remaining-usd"] == first.headers["x-abc-budget-remaining-usd"], i
    streamed = [i for i, (path, body) in enumerate(CALLS) if body.get("stream")]
    for i in streamed:
        events = [line for line in replayed[i].text.split("\n\n") if line.startswith("data: ")]
        assert events == [line for line in recorded[i].text.split("\n\n") if line.startswith("data: ")]

    # Same spend, the replay's own journal (same kinds), and a chain that verifies.
    assert gateway.session(replay["session_id"])["spent_nanos"] == gateway.session(source)["spent_nanos"]
    assert gateway.session(replay["session_id"])["replay_of"] == source
    assert _kinds(redis_url, replay["session_id"]) == _kinds(redis_url, source)
    assert _replay(gateway, replay["session_id"], mode="verify").json()["integrity"] == "ok"


def test_a_changed_request_diverges_with_409_naming_the_index_and_a_diff(gateway: Gateway, redis_url: str) -> None:
    source, recorded = _record(gateway)
    replay = _replay(gateway, source, mode="recorded").json()
    with _client(gateway, replay["token"]) as client:
        assert _send(client, 0).content == recorded[0].content
        changed = {**CALLS[1][1], "messages": [{"role": "user", "content": "Where is order B-99?"}]}
        diverged = client.post(CALLS[1][0], json=changed)
        assert diverged.status_code == 409
        error = diverged.json()["error"]
        assert error["code"] == "replay_divergence" and error["type"] == "conflict_error"
        assert error["index"] == 1 and error["recorded_request_id"] == recorded[1].headers["x-request-id"]
        assert error["diff"] == [{
            "path": "messages[0].content", "recorded": QUESTION[0]["content"], "received": "Where is order B-99?",
        }]
        # Nothing moved: the recorded request is still the one expected next.
        assert _send(client, 1).content == recorded[1].content
        for i in range(2, len(CALLS)):
            _send(client, i)
        past_the_end = _send(client, 0)
    assert past_the_end.status_code == 409
    assert past_the_end.json()["error"]["index"] == len(CALLS) - 1
    # The replay session journals the divergence like any failed call, at no cost.
    kinds = _kinds(redis_url, replay["session_id"])
    assert kinds[3:5] == ["request", "error"]


def _send(client: httpx.Client, i: int) -> httpx.Response:
    path, body = CALLS[i]
    return client.post(path, json=body)


def test_a_live_replay_matches_every_call_with_the_deterministic_mock(gateway: Gateway) -> None:
    source, _ = _record(gateway)
    live = _replay(gateway, source, mode="live")
    assert live.status_code == 200, live.text
    report = live.json()
    assert report["calls"] == len(report["results"]) == len(CALLS) - 1
    assert report["matched"] == len(CALLS) - 1 and report["differed"] == report["unknown"] == 0
    assert [r["answer"] for r in report["results"]] == [r["recorded"] for r in report["results"]]
    # It ran through the spine in a new session of its own: charged and journaled.
    assert gateway.session(report["session_id"])["spent_nanos"] == gateway.session(source)["spent_nanos"]


def test_a_live_replay_reports_the_call_whose_answer_differs(gateway: Gateway, redis_url: str) -> None:
    source, recorded = _record(gateway)
    client = client_for(redis_url)
    key = redis_keys.journal(source)
    entries = client.xrange(key)
    client.delete(key)
    target = recorded[3].headers["x-request-id"].encode()  # the text streamed after the tool result
    for _, fields in entries:
        if fields[b"kind"] == b"stream" and fields[b"rid"] == target:
            fields[b"body"] = entry_body(fields).replace(b'"content":"', b'"content":"Hm, ', 2)  # type: ignore[union-attr]
            fields.pop(b"enc", None)
    for entry_id, fields in entries:
        client.xadd(key, fields, id=entry_id)
    client.close()

    pages, into, offset = [], None, 0
    while offset is not None:
        body: dict[str, Any] = {"mode": "live", "offset": offset, "limit": 4}
        if into:
            body["into"] = into
        page = _replay(gateway, source, **body).json()
        pages.append(page)
        into, offset = page["session_id"], page["next"]
    results = [r for page in pages for r in page["results"]]
    assert len(pages) == 3 and len({p["session_id"] for p in pages}) == 1
    assert [r["index"] for r in results] == list(range(len(CALLS) - 1))
    assert [r["match"] for r in results].count(False) == 1
    assert next(r for r in results if r["match"] is False)["recorded_request_id"] == target.decode()


def test_live_pages_refuse_a_session_that_is_not_this_replays(gateway: Gateway) -> None:
    source, _ = _record(gateway)
    other = gateway.open_session(OPEN_PLAN)["session_id"]
    response = _replay(gateway, source, mode="live", limit=1, into=other)
    assert response.status_code == 400
    assert _replay(gateway, source, mode="verify", limit=1).status_code == 400


def _cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ABC_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--url", gw.base_url],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.parametrize("mode", ["verify", "recorded", "live"])
def test_the_cli_replays_with_a_progress_bar_and_a_summary_table(gateway: Gateway, mode: str) -> None:
    source, _ = _record(gateway)
    done = _cli(gateway, "replay", source, "--mode", mode)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[" + "#" * 30 + "]" in done.stderr  # the finished bar
    if mode == "verify":
        assert done.stdout.split("\n")[2].startswith("ok")
        return
    rows = [line for line in done.stdout.splitlines() if re.match(r"\d+ +req_", line)]
    assert len(rows) == len(CALLS) - 1 and all(row.rstrip().endswith("match") for row in rows)
    assert f"{len(CALLS) - 1} calls: {len(CALLS) - 1} match, 0 differ" in done.stdout


def test_the_cli_exits_non_zero_when_the_chain_is_broken(gateway: Gateway, redis_url: str) -> None:
    source, _ = _record(gateway)
    client = client_for(redis_url)
    first = client.xrange(redis_keys.journal(source), count=1)[0][0]
    client.xdel(redis_keys.journal(source), first)
    client.close()
    done = _cli(gateway, "replay", source, "--mode", "verify")
    assert done.returncode == 1 and "broken" in done.stdout
