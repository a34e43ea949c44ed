"""Pure parts of the journal tools: the request diff of a divergence, recorded errors
answered again as themselves, and export lines that keep every stored byte."""

from __future__ import annotations

from gateway.errors import BudgetExceeded, InvalidRequest, UpstreamError, UpstreamTimeout
from gateway.journal.recorded import MAX_DIFFS, group_calls, json_diff, recorded_error
from gateway.state.entries import Kind, link, make_entry, verify_chain
from gateway.state.export import decoded, export_line, lines_to_entries


def test_the_diff_names_each_differing_path() -> None:
    recorded = {"model": "m", "messages": [{"role": "user", "content": "a"}], "n": 1}
    received = {"model": "m", "messages": [{"role": "user", "content": "b"}, {"role": "user"}], "stream": True}
    assert json_diff(recorded, received) == [
        {"path": "messages[0].content", "recorded": "a", "received": "b"},
        {"path": "messages[1]", "recorded": "<absent>", "received": {"role": "user"}},
        {"path": "n", "recorded": 1, "received": "<absent>"},
        {"path": "stream", "recorded": "<absent>", "received": True},
    ]


def test_the_diff_tells_types_apart_and_stays_short() -> None:
    assert json_diff({"n": 1}, {"n": True}) == [{"path": "n", "recorded": 1, "received": True}]
    assert json_diff({"n": 1}, {"n": 1.0}) == [{"path": "n", "recorded": 1, "received": 1.0}]
    assert len(json_diff(list(range(50)), list(range(1, 51)))) == MAX_DIFFS
    assert json_diff({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]}) == []


def test_a_recorded_error_comes_back_with_its_status_type_and_code() -> None:
    def error(status: int, code: str) -> dict[bytes, bytes]:
        return {b"status": str(status).encode(), b"code": code.encode(), b"message": b"it broke"}

    upstream = recorded_error(error(502, "upstream_error"))
    assert isinstance(upstream, UpstreamError) and upstream.to_dict()["error"] == {
        "message": "it broke", "type": "upstream_error", "param": None, "code": "upstream_error",
    }
    assert isinstance(recorded_error(error(504, "upstream_timeout")), UpstreamTimeout)
    assert isinstance(recorded_error(error(429, "budget_exceeded")), BudgetExceeded)
    passed_through = recorded_error(error(422, "bad_schema"))
    assert isinstance(passed_through, InvalidRequest) and passed_through.status == 422


def test_export_lines_keep_compressed_bodies_and_verify_offline() -> None:
    big = b'{"text":"' + b"x" * 10_000 + b'"}'
    entry = make_entry(Kind.RESPONSE, rid="r1", cost=5, body=big, compress_over=100)
    fields = {b"seq": b"1", b"prev": b"", b"digest": entry.digest.encode(), b"step": b"", **entry.fields}
    fields[b"hash"] = link("", 1, entry.digest, "").encode()
    line = export_line(b"1-0", fields)
    assert isinstance(line["fields"]["body"], dict)  # compressed: base64
    entries = lines_to_entries([line])
    assert entries == [(b"1-0", fields)]
    assert verify_chain(entries).ok
    shown = decoded(b"1-0", fields)
    assert shown["body"] == {"text": "x" * 10_000} and shown["cost"] == 5 and "enc" not in shown


def test_calls_pair_each_request_with_what_closed_it() -> None:
    def entry(kind: str, rid: str) -> dict[bytes, bytes]:
        return {b"kind": kind.encode(), b"rid": rid.encode(), b"req_hash": b"h"}

    stream = [
        (b"1-0", {b"kind": b"state"}),
        (b"2-0", entry("request", "a")),
        (b"3-0", entry("request", "b")),
        (b"4-0", entry("aborted", "a")),
        (b"5-0", entry("response", "a")),  # a late settle after the reaper: it has the last word
        (b"6-0", entry("denial", "c")),
        (b"7-0", entry("request", "d")),
        (b"8-0", entry("error", "d")),
    ]
    calls = group_calls(stream)
    assert [(c.index, c.request_id, c.outcome_entry) for c in calls] == [(0, "a", "5-0"), (1, "b", ""), (2, "d", "8-0")]
    assert calls[1].outcome is None and calls[1].listed() == "h|3-0|"
