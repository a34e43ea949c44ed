"""The journal holds every call in order, hash-chained: the admin API pages through it,
`verify` finds a changed field at its seq, and export-then-trim keeps it verifiable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import redis_keys
from gateway.state.entries import verify_chain
from gateway.state.export import lines_to_entries
from tests.conftest import ADMIN_TOKEN, BOTH_REDIS, OPEN_PLAN, ROOT, Gateway
from tests.redis_proc import client_for

pytestmark = BOTH_REDIS  # each test runs on a single Redis and on a Redis Cluster

HI = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "refund_order", "parameters": {"type": "object", "properties": {}}}}]
TERMINAL = {"response", "stream", "error", "aborted"}

# (request body, path, what the journal must say about it)
MIXED: list[tuple[dict[str, Any], str, list[str]]] = [
    ({"model": "gpt-4o-mini", "messages": HI}, "/chat/completions", ["request", "response"]),
    ({"model": "gpt-4o-mini", "messages": HI, "stream": True}, "/chat/completions", ["request", "stream"]),
    ({"model": "no-such-model", "messages": HI}, "/chat/completions", ["denial"]),
    ({"model": "mock-error", "messages": HI}, "/chat/completions", ["request", "error"]),
    ({"model": "gpt-4o-mini", "messages": HI, "tools": TOOLS}, "/chat/completions", ["denial"]),
    ({"model": "mock-cut", "messages": HI, "stream": True}, "/chat/completions", ["request", "error"]),
    ({"model": "text-embedding-3-small", "input": "hi"}, "/embeddings", ["request", "response"]),
    ({"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True}, "/completions", ["request", "stream"]),
    ({"model": "mock-error", "messages": HI, "stream": True}, "/chat/completions", ["request", "error"]),
]


def _journal_api(gw: Gateway, session_id: str, **params: Any) -> dict[str, Any]:
    response = gw.admin.get(f"/admin/v1/sessions/{session_id}/journal", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def _verify(gw: Gateway, session_id: str) -> dict[str, Any]:
    response = gw.admin.post(f"/admin/v1/sessions/{session_id}/replay", json={"mode": "verify"})
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


def _run_mixed(gw: Gateway) -> tuple[str, list[str]]:
    opened = gw.open_session(OPEN_PLAN)
    headers = {"Authorization": f"Bearer {opened['token']}"}
    request_ids = []
    with httpx.Client(base_url=gw.openai_base, headers=headers, timeout=30) as client:
        for body, path, _ in MIXED:
            response = client.post(path, json=body)
            request_ids.append(response.headers["x-request-id"])
    return opened["session_id"], request_ids


def test_mixed_calls_are_journaled_in_order_and_the_chain_verifies(gateway: Gateway) -> None:
    session_id, request_ids = _run_mixed(gateway)
    entries = _journal_api(gateway, session_id, limit=1000)["entries"]

    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert entries[0]["kind"] == "state" and entries[0]["event"] == "opened"
    expected = [kind for _, _, kinds in MIXED for kind in kinds]
    assert [e["kind"] for e in entries[1:]] == expected
    # Each call's entries carry the id the client saw, the request strictly before its end.
    rest = iter(entries[1:])
    for (_, _, kinds), rid in zip(MIXED, request_ids, strict=True):
        for kind in kinds:
            entry = next(rest)
            assert (entry["kind"], entry["rid"]) == (kind, rid)
    for entry in entries:
        if entry["kind"] == "request":
            assert isinstance(entry["body"], dict) and entry["req_hash"] and entry["est_nanos"] > 0
        if entry["kind"] in TERMINAL:
            assert isinstance(entry["cost_nanos"], int)
    cut = next(e for e in entries if e["kind"] == "error" and e["rid"] == request_ids[5])
    assert cut["chunks"] > 0 and isinstance(cut["body"], str)  # what reached the client before the cut

    report = _verify(gateway, session_id)
    assert report == {
        "mode": "verify", "session_id": session_id, "integrity": "ok", "entries": len(entries),
        "first_broken_seq": None, "first_broken_id": None, "reason": None,
    }


def _rewrite(redis_url: str, session_id: str, seq: int, field: bytes, change: Any) -> None:
    """What someone with redis-cli could do: read the stream, DEL it, XADD it back with the
    same ids and one field of one entry changed."""
    client = client_for(redis_url)
    key = redis_keys.journal(session_id)
    try:
        entries = client.xrange(key)
        client.delete(key)
        for entry_id, fields in entries:
            if int(fields[b"seq"]) == seq:
                fields[field] = change(fields[field])
            client.xadd(key, fields, id=entry_id)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("field", "change", "why"),
    [
        (b"cost_nanos", lambda v: b"1", "content does not match its digest"),
        (b"body", lambda v: v.replace(b"hi", b"ho"), "content does not match its digest"),
        (b"step", lambda v: b"answer", "hash does not match"),
        (b"prev", lambda v: b"0" * 40, "prev does not match"),
    ],
)
def test_verify_finds_one_changed_field_at_its_seq(
    gateway: Gateway, redis_url: str, field: bytes, change: Any, why: str
) -> None:
    session_id, _ = _run_mixed(gateway)
    entries = _journal_api(gateway, session_id, limit=1000)["entries"]
    target = next(e for e in entries if e["kind"] == ("request" if field == b"body" else "response"))
    _rewrite(redis_url, session_id, target["seq"], field, change)

    report = _verify(gateway, session_id)
    assert report["integrity"] == "broken"
    assert report["first_broken_seq"] == target["seq"]
    assert report["first_broken_id"] == target["id"]
    assert why in report["reason"]


def test_verify_finds_entries_deleted_from_the_end(gateway: Gateway, redis_url: str) -> None:
    session_id, _ = _run_mixed(gateway)
    entries = _journal_api(gateway, session_id, limit=1000)["entries"]
    client = client_for(redis_url)
    client.xdel(redis_keys.journal(session_id), entries[-1]["id"])
    client.close()

    report = _verify(gateway, session_id)
    assert report["integrity"] == "broken"
    assert report["first_broken_seq"] == entries[-1]["seq"]
    assert "head" in report["reason"]


def test_the_journal_pages_with_a_cursor_and_decodes_fields(gateway: Gateway) -> None:
    session_id, _ = _run_mixed(gateway)
    whole = _journal_api(gateway, session_id, limit=1000)["entries"]
    seen: list[dict[str, Any]] = []
    after = ""
    while True:
        page = _journal_api(gateway, session_id, limit=4, after=after)
        seen += page["entries"]
        assert len(page["entries"]) <= 4
        if page["next"] is None:
            break
        assert page["next"] == page["entries"][-1]["id"]
        after = page["next"]
    assert seen == whole

    stream = next(e for e in whole if e["kind"] == "stream")
    assert stream["chunks"] == len(stream["body"].split("\n")) and stream["ttft_us"] >= 0
    request = next(e for e in whole if e["kind"] == "request" and e["stream"])
    assert request["stream"] is True and request["body"]["stream"] is True
    assert all(isinstance(e["hash"], str) and len(e["hash"]) == 40 for e in whole)


def test_the_journal_api_rejects_bad_cursors_and_unknown_sessions(gateway: Gateway) -> None:
    session_id, _ = _run_mixed(gateway)
    assert gateway.admin.get(f"/admin/v1/sessions/{session_id}/journal", params={"limit": 0}).status_code == 400
    assert gateway.admin.get(f"/admin/v1/sessions/{session_id}/journal", params={"after": "x"}).status_code == 400
    assert gateway.admin.get("/admin/v1/sessions/sess_000000000000/journal").status_code == 404
    assert httpx.get(gateway.base_url + f"/admin/v1/sessions/{session_id}/journal").status_code == 401
    bad_mode = gateway.admin.post(f"/admin/v1/sessions/{session_id}/replay", json={"mode": "rewind"})
    assert bad_mode.status_code == 400


def _cli(gw: Gateway, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ABC_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--url", gw.base_url],
        cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
    )


def test_export_then_trim_keeps_the_rest_verifiable(gateway: Gateway, redis_url: str, tmp_path: Path) -> None:
    session_id, _ = _run_mixed(gateway)
    before = _journal_api(gateway, session_id, limit=1000)["entries"]
    archive = tmp_path / "journal.jsonl"
    with archive.open("w") as out:
        done = _cli(gateway, "journal", "export", session_id, "--trim", stdout=out)
    assert done.returncode == 0, done.stderr
    assert f"trimmed {len(before)} entries" in done.stderr

    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [line["id"] for line in lines] == [e["id"] for e in before]
    offline = verify_chain(lines_to_entries(lines))
    assert offline.ok and offline.entries == len(before)
    client = client_for(redis_url)
    assert client.xlen(redis_keys.journal(session_id)) == 0
    client.close()

    # New entries chain on from the trimmed head; both the rest and a second archive verify.
    revoke = gateway.admin.post(f"/admin/v1/sessions/{session_id}/revoke", json={})
    assert revoke.status_code == 200
    report = _verify(gateway, session_id)
    assert report["integrity"] == "ok" and report["entries"] == 1  # the `revoked` state entry

    second = tmp_path / "more.jsonl"
    with second.open("w") as out:
        assert _cli(gateway, "journal", "export", session_id, stdout=out).returncode == 0
    more = [json.loads(line) for line in second.read_text().splitlines()]
    chained = verify_chain(lines_to_entries(more), prev=lines[-1]["fields"]["hash"], first_seq=len(lines) + 1)
    assert chained.ok and chained.entries == 1


def test_trim_refuses_a_hash_that_is_not_the_entrys(gateway: Gateway) -> None:
    session_id, _ = _run_mixed(gateway)
    last = _journal_api(gateway, session_id, limit=1000)["entries"][-1]
    response = gateway.admin.post(
        f"/admin/v1/sessions/{session_id}/journal/trim", json={"through": last["id"], "exported_hash": "0" * 40}
    )
    assert response.status_code == 409 and response.json()["error"]["code"] == "trim_mismatch"
    assert len(_journal_api(gateway, session_id, limit=1000)["entries"]) == last["seq"]
