"""Responses and Messages calls in a session's life: a recorded replay of a session that mixes
them with chat (tools, streams, a conversation by previous_response_id, a cut stream, a
denial) answers byte for byte at the same spend; streams that fail after they started end
with the dialect's error event and are charged for what was sent; Idempotency-Key holds."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import redis

from gateway import redis_keys
from tests.conftest import OPEN_PLAN, Gateway

RESPONSES_TOOL = {"type": "function", "name": "lookup_order",
                  "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}
MESSAGES_TOOL = {"name": "lookup_order", "input_schema": {"type": "object", "properties": {"order_id": {"type": "string"}}}}
QUESTION = "My order A-1234 has not arrived. Can you check it?"


def journal(redis_url: str, session_id: str) -> list[dict[str, Any]]:
    """A session's entries, fields decoded; bodies left out (a stream's holds one event per line)."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.xrange(redis_keys.journal(session_id))
    finally:
        client.close()
    return [{k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"body"} for _, fields in raw]


def _client(gw: Gateway, token: str) -> httpx.Client:
    return httpx.Client(base_url=gw.openai_base, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _session(gw: Gateway, client: httpx.Client) -> list[httpx.Response]:
    """One session through every kind of call; later calls depend on earlier answers."""
    answers = [
        client.post("/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": QUESTION}]}),
        client.post("/responses", json={"model": "gpt-4o-mini", "input": QUESTION, "tools": [RESPONSES_TOOL]}),
    ]
    call = answers[1].json()["output"][0]
    answers.append(client.post("/responses", json={
        "model": "gpt-4o-mini", "previous_response_id": answers[1].json()["id"], "tools": [RESPONSES_TOOL], "stream": True,
        "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": '{"status": "shipped"}'}]}))
    answers += [
        client.post("/messages", json={"model": "gpt-4o-mini", "max_tokens": 64, "stream": True, "tools": [MESSAGES_TOOL],
                                       "messages": [{"role": "user", "content": QUESTION}]}),
        client.post("/messages", json={"model": "gpt-4o", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}),
        client.post("/messages", json={"model": "mock-cut", "max_tokens": 64, "stream": True,
                                       "messages": [{"role": "user", "content": QUESTION}]}),
        client.post("/responses", json={"model": "mock-cut", "input": QUESTION, "stream": True}),
        client.post("/responses", json={"model": "not-allowed", "input": "hi"}),
        client.post("/chat/completions", json={"model": "gpt-4o-mini", "stream": True,
                                               "messages": [{"role": "user", "content": QUESTION}]}),
    ]
    return answers


def test_a_recorded_replay_of_a_mixed_session_answers_byte_for_byte(gw: Gateway, redis_url: str) -> None:
    opened = gw.open_session(OPEN_PLAN)
    with _client(gw, opened["token"]) as client:
        recorded = _session(gw, client)
    assert [r.status_code for r in recorded] == [200, 200, 200, 200, 200, 200, 200, 404, 200]
    assert b"event: response.completed" in recorded[2].content
    assert b"event: message_stop" in recorded[3].content and b'"tool_use"' in recorded[3].content
    assert recorded[5].content.endswith(b"\n\n") and b"event: error" in recorded[5].content
    assert b'"type":"error"' in recorded[6].content.rsplit(b"event: ", 1)[-1]

    replay = gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/replay", json={"mode": "recorded"}).json()
    with _client(gw, replay["token"]) as client:
        replayed = _session(gw, client)
    for i, (first, again) in enumerate(zip(recorded, replayed, strict=True)):
        assert (again.status_code, again.content) == (first.status_code, first.content), i
    assert gw.session(replay["session_id"])["spent_nanos"] == gw.session(opened["session_id"])["spent_nanos"]
    kinds = [e["kind"] for e in journal(redis_url, replay["session_id"]) if e["kind"] != "state"]
    assert kinds == [e["kind"] for e in journal(redis_url, opened["session_id"]) if e["kind"] != "state"]
    assert gw.admin.post(f"/admin/v1/sessions/{replay['session_id']}/replay", json={"mode": "verify"}).json()["integrity"] == "ok"


def test_a_stream_cut_upstream_ends_with_the_dialect_error_event_and_is_charged(gw: Gateway, redis_url: str) -> None:
    opened = gw.open_session(OPEN_PLAN)
    with _client(gw, opened["token"]) as client:
        cut = client.post("/messages", json={"model": "mock-cut", "max_tokens": 256, "stream": True,
                                             "messages": [{"role": "user", "content": QUESTION}]})
    frames = cut.content.decode().split("\n\n")
    assert frames[0].startswith("event: message_start") and frames[-2].startswith("event: error")
    error = orjson.loads(frames[-2].split("data: ", 1)[1])
    assert error == {"type": "error", "error": {"type": "api_error", "message": "mock upstream cut the stream", "code": "upstream_error"}}
    last = journal(redis_url, opened["session_id"])[-1]
    assert last["kind"] == "error" and int(last["tok_out"]) > 0 and int(last["cost_nanos"]) > 0
    assert int(gw.session(opened["session_id"])["reserved_nanos"]) == 0


def test_an_idempotency_key_answers_a_dialect_retry_once(gw: Gateway) -> None:
    opened = gw.open_session(OPEN_PLAN)
    with _client(gw, opened["token"]) as client:
        for path, body in (("/responses", {"model": "gpt-4o-mini", "input": "hi"}),
                           ("/messages", {"model": "gpt-4o-mini", "max_tokens": 32, "stream": True,
                                          "messages": [{"role": "user", "content": "hi"}]})):
            headers = {"Idempotency-Key": "key-" + path}
            first = client.post(path, json=body, headers=headers)
            spent = gw.session(opened["session_id"])["spent_nanos"]
            again = client.post(path, json=body, headers=headers)
            assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
            assert gw.session(opened["session_id"])["spent_nanos"] == spent


def test_a_denied_dialect_call_is_journaled_with_the_body_the_client_sent(gw: Gateway, redis_url: str) -> None:
    opened = gw.open_session(OPEN_PLAN)
    body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 99_999, "messages": [{"role": "user", "content": "hi"}]}
    with _client(gw, opened["token"]) as client:
        denied = client.post("/messages", json=body)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    entry = journal(redis_url, opened["session_id"])[-1]
    assert entry["kind"] == "denial" and entry["rule"] == "max_tokens_cap"
