"""`abc-gateway replay SESSION --mode ...` and `abc-gateway journal export SESSION [--trim]`.

Both talk to a running gateway's admin API (--url, $ABC_ADMIN_TOKEN), like `admin`:
no Redis credentials on the operator's machine. A recorded replay is driven from here:
each recorded request is sent again with the replay session's token and the answer is
compared byte for byte with the recording. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from gateway.admin_cli import AdminClient, client_from, print_table
from gateway.journal.recorded import RecordedCall, group_calls
from gateway.money import nanos_to_usd_str
from gateway.state.entries import Kind, entry_body, entry_cost_nanos
from gateway.state.export import PAGE, lines_to_entries

BAR_WIDTH = 30


def progress(done: int, total: int, label: str = "") -> None:
    filled = BAR_WIDTH * done // total if total else BAR_WIDTH
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    end = "\n" if done >= total else ""
    # Padded so a shorter label overwrites a longer one on the same line.
    print(f"\r[{bar}] {done}/{total} {label}".ljust(100), end=end, file=sys.stderr, flush=True)


def export_lines(client: AdminClient, session_id: str) -> Iterator[dict[str, Any]]:
    after = ""
    while True:
        page = client.call("GET", f"/admin/v1/sessions/{session_id}/journal?format=export&limit={PAGE}&after={after}")
        yield from page["entries"]
        if page["next"] is None:
            return
        after = page["next"]


def _export(args: argparse.Namespace) -> int:
    client = client_from(args)
    last: dict[str, Any] | None = None
    count = 0
    for line in export_lines(client, args.session_id):
        sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")
        last, count = line, count + 1
    sys.stdout.flush()
    try:
        os.fsync(sys.stdout.fileno())  # a file must be on disk before anything is trimmed
    except OSError:
        pass  # a pipe or a terminal: nothing to sync
    print(f"exported {count} entries of {args.session_id}", file=sys.stderr)
    if args.trim and last is not None:
        done = client.call(
            "POST", f"/admin/v1/sessions/{args.session_id}/journal/trim",
            {"through": last["id"], "exported_hash": last["fields"]["hash"]},
        )
        print(f"trimmed {done['trimmed']} entries; the journal now starts at seq {done['first_seq']}", file=sys.stderr)
    return 0


def _replay(args: argparse.Namespace) -> int:
    client = client_from(args)
    if args.mode == "verify":
        progress(0, 1, "verifying")
        report = client.call("POST", f"/admin/v1/sessions/{args.session_id}/replay", {"mode": "verify"})
        progress(1, 1, "verified")
        print_table([report], ["integrity", "entries", "first_broken_seq", "first_broken_id", "reason"])
        return 0 if report["integrity"] == "ok" else 1
    rows = _live(client, args.session_id) if args.mode == "live" else _recorded(client, args)
    print_table(rows, ["index", "request_id", "recorded", "answer", "result"])
    counts = {r: sum(row["result"] == r for row in rows) for r in ("match", "differs", "no record")}
    print(f"\n{len(rows)} calls: {counts['match']} match, {counts['differs']} differ, {counts['no record']} without a recorded answer")
    return 0 if counts["differs"] == 0 else 1


def _live(client: AdminClient, source: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    body: dict[str, Any] = {"mode": "live", "offset": 0, "limit": 1}
    while True:
        page = client.call("POST", f"/admin/v1/sessions/{source}/replay", body)
        for r in page["results"]:
            result = {True: "match", False: "differs", None: "no record"}[r["match"]]
            rows.append({"index": r["index"], "request_id": r["recorded_request_id"], "recorded": r["recorded"], "answer": r["answer"], "result": result})
        progress(len(rows), page["calls"], f"live session {page['session_id']}")
        if page["next"] is None:
            return rows
        body = {"mode": "live", "offset": page["next"], "limit": 1, "into": page["session_id"]}


def _recorded(client: AdminClient, args: argparse.Namespace) -> list[dict[str, Any]]:
    calls = group_calls(lines_to_entries(export_lines(client, args.session_id)))
    opened = client.call("POST", f"/admin/v1/sessions/{args.session_id}/replay", {"mode": "recorded"})
    print(f"replay session {opened['session_id']} on {opened['assembly_id']}", file=sys.stderr)
    rows = []
    for call in calls:
        status, body = _send(client.url, opened["token"], call)
        recorded = call.outcome.get(b"kind", b"").decode() if call.outcome else None
        rows.append({
            "index": call.index, "request_id": call.request_id, "recorded": recorded,
            "answer": status, "result": _compare(call, status, body),
        })
        progress(len(rows), len(calls), call.request_id)
    if not calls:
        progress(0, 0, "nothing recorded")
    return rows


def _send(base_url: str, token: str, call: RecordedCall) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{base_url}/v1/{call.endpoint.value}", data=entry_body(call.request), method="POST")
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def expected_bytes(outcome: dict[bytes, bytes] | Any) -> bytes | None:
    """What a client received for a recorded response or stream, byte for byte."""
    kind = outcome.get(b"kind", b"").decode()
    raw = entry_body(outcome) or b""
    if kind == Kind.RESPONSE:
        return raw
    if kind == Kind.STREAM:
        events = b"".join(b"data: " + p + b"\n\n" for p in raw.split(b"\n")) if raw else b""
        cost = nanos_to_usd_str(entry_cost_nanos(outcome)).encode()
        return events + b": abc-cost-usd " + cost + b"\n\ndata: [DONE]\n\n"
    return None


def _compare(call: RecordedCall, status: int, body: bytes) -> str:
    if call.outcome is None or call.outcome.get(b"kind") == Kind.ABORTED.encode():
        return "no record"
    expected = expected_bytes(call.outcome)
    if expected is not None:
        return "match" if status == 200 and body == expected else "differs"
    code = call.outcome.get(b"code", b"").decode()
    return "match" if error_code(body) == code else "differs"


def error_code(body: bytes) -> str | None:
    """The `code` of an OpenAI error body, or of the error event ending an SSE body."""
    candidates = [body] + [line[6:] for line in body.split(b"\n") if line.startswith(b'data: {"error"')]
    for candidate in reversed(candidates):
        try:
            error = json.loads(candidate).get("error")
        except (ValueError, AttributeError):
            continue
        if isinstance(error, dict):
            return str(error.get("code"))
    return None


def add_journal_commands(sub: Any) -> None:
    url = os.environ.get("ABC_GATEWAY_URL", "http://127.0.0.1:8080")
    replay = sub.add_parser("replay", help="verify a session's journal, or replay it (recorded or live)")
    replay.add_argument("session_id")
    replay.add_argument("--mode", choices=("verify", "recorded", "live"), default="verify")
    replay.add_argument("--url", default=url)
    replay.set_defaults(run=_replay)

    journal = sub.add_parser("journal", help="archive a session's journal")
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    exp = jsub.add_parser("export", help="write the journal as JSON lines to stdout")
    exp.add_argument("session_id")
    exp.add_argument("--trim", action="store_true", help="after a complete export, drop the exported entries from Redis")
    exp.add_argument("--url", default=url)
    exp.set_defaults(run=_export)
