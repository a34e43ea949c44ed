"""A journal recorded by an earlier build stays verifiable and replays to the same bytes.

`journals/support-session.jsonl` is an export (`abc-gateway journal export`) of a session
that used tools, streaming, an upstream error and a cut stream. It is loaded into Redis
under a new session, its chain is verified, and a recorded replay must answer every
recorded request with exactly the recorded bytes. A failure means the journal format, the
chain, or replay changed: old journals would no longer replay. Regenerate (only for an
intended change, and say why in the commit) with `python -m tests.golden.test_replay_equality`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import redis

from gateway import redis_keys
from gateway.journal.recorded import group_calls
from gateway.journal_cli import error_code, expected_bytes
from gateway.state.entries import entry_body, verify_chain
from gateway.state.export import lines_to_entries
from tests.conftest import Gateway

GOLDEN = Path(__file__).resolve().parent / "journals" / "support-session.jsonl"
TOOLS = [{"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order by id",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}}]
PLAN: dict[str, Any] = {
    "name": "golden-replay",
    "tenant": "acme",
    "models": [
        {"name": "gpt-4o-mini", "max_tokens": 128},
        {"name": "text-embedding-3-small", "max_tokens": 1},
        {"name": "gpt-3.5-turbo-instruct", "max_tokens": 64},
        {"name": "mock-error", "max_tokens": 32},
        {"name": "mock-cut", "max_tokens": 64},
    ],
    "tools": [TOOLS[0]["function"]],
    "budget": {"usd": 1.0},
}
QUESTION = [{"role": "user", "content": "My order A-1234 has not arrived. Can you check it?"}]
TOOL_TURN = [
    *QUESTION,
    {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A-1234"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped", "eta": "tomorrow"}'},
]
RECORDED_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/chat/completions", {"model": "gpt-4o-mini", "messages": QUESTION}),
    ("/chat/completions", {"model": "gpt-4o-mini", "messages": QUESTION, "tools": TOOLS, "stream": True}),
    ("/chat/completions", {"model": "gpt-4o-mini", "messages": TOOL_TURN, "tools": TOOLS, "stream": True,
                           "stream_options": {"include_usage": True}}),
    ("/chat/completions", {"model": "mock-error", "messages": QUESTION}),
    ("/chat/completions", {"model": "mock-cut", "messages": QUESTION, "stream": True}),
    ("/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello", "stream": True}),
    ("/embeddings", {"model": "text-embedding-3-small", "input": "hello", "dimensions": 8}),
]


def _lines() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLDEN.read_text().splitlines()]


def _load(redis_url: str, session_id: str, lines: list[dict[str, Any]]) -> None:
    """Put the archived entries back as the session's journal, head included."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(redis_keys.journal(session_id))
        for entry_id, fields in lines_to_entries(lines):
            client.xadd(redis_keys.journal(session_id), fields, id=entry_id)
        last = lines[-1]["fields"]
        client.hset(redis_keys.journal_head(session_id), mapping={"seq": last["seq"], "hash": last["hash"]})
    finally:
        client.close()


def test_the_golden_journal_verifies_offline() -> None:
    lines = _lines()
    report = verify_chain(lines_to_entries(lines))
    assert report.ok and report.entries == len(lines)
    kinds = [line["fields"]["kind"] for line in lines]
    assert kinds.count("request") == len(RECORDED_CALLS) and {"stream", "error", "response"} <= set(kinds)


def test_the_golden_journal_replays_to_the_recorded_bytes(gateway: Gateway, redis_url: str) -> None:
    lines = _lines()
    source = gateway.open_session(PLAN)["session_id"]
    _load(redis_url, source, lines)
    verified = gateway.admin.post(f"/admin/v1/sessions/{source}/replay", json={"mode": "verify"}).json()
    assert verified["integrity"] == "ok" and verified["entries"] == len(lines)

    replay = gateway.admin.post(f"/admin/v1/sessions/{source}/replay", json={"mode": "recorded"}).json()
    calls = group_calls(lines_to_entries(lines))
    assert replay["calls"] == len(calls) == len(RECORDED_CALLS)
    headers = {"Authorization": f"Bearer {replay['token']}", "content-type": "application/json"}
    with httpx.Client(base_url=gateway.openai_base, headers=headers, timeout=30) as client:
        for call in calls:
            assert call.outcome is not None
            answer = client.post("/" + call.endpoint.value, content=entry_body(call.request))
            expected = expected_bytes(call.outcome)
            if expected is None:  # a recorded error: the same error again
                assert error_code(answer.content) == call.outcome[b"code"].decode(), call.index
            else:
                assert answer.status_code == 200 and answer.content == expected, call.index


def _regenerate() -> None:
    """Record RECORDED_CALLS through a real gateway with the mock provider and export them."""
    import tempfile

    from gateway.capability import Keyring
    from tests.conftest import SIGNING_SECRET, make_settings, start_gateway
    from tests.redis_proc import RedisProcess

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(Path(tmp)).start()
        try:
            gw = start_gateway(make_settings(), server.url, Keyring.from_sources(SIGNING_SECRET))
            opened = gw.open_session(PLAN)
            with httpx.Client(base_url=gw.openai_base, headers={"Authorization": f"Bearer {opened['token']}"}) as client:
                for path, body in RECORDED_CALLS:
                    client.post(path, json=body)
            page = gw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal", params={"format": "export", "limit": 1000}).json()
            GOLDEN.parent.mkdir(exist_ok=True)
            GOLDEN.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in page["entries"]))
            gw.close()
        finally:
            server.stop()
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    _regenerate()
