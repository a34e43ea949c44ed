"""`plan evaluate --live` against a real gateway: a session recorded on one model, its requests
run again on a candidate that swaps the model (the mock answers each model differently), the
two answers side by side; the stated cap stops a run through the ordinary reservation; a
request the candidate denies is never sent; the API and the CLI both work; bad input is a 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
import yaml

from gateway import redis_keys
from gateway.assembly.compile import compile_plan
from gateway.assembly.plan import parse_plan
from gateway.capability import Keyring
from gateway.http.keys import DEPS
from gateway.money import cost_nanos
from gateway.pipeline import policy
from gateway.pipeline.usage import estimate
from gateway.providers.base import Endpoint
from gateway.providers.mock import MockProvider
from gateway.settings import Price, Settings
from tests.conftest import Gateway, assert_no_server_errors, make_settings, start_gateway
from tests.e2e.test_cli import ok, run
from tests.openai_support import openai_error, sdk

LOOKUP = {
    "name": "lookup_order",
    "description": "Find an order by id",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}
LOOKUP_TOOL: Any = {"type": "function", "function": LOOKUP}
RECORDED_PLAN: dict[str, Any] = {
    "name": "live-bot",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 256}],
    "tools": [LOOKUP],
    "budget": {"usd": 1},
}
# The next version: another model, and the tool taken away.
CANDIDATE: dict[str, Any] = {**RECORDED_PLAN, "models": [{"name": "gpt-4o", "max_tokens": 256}], "tools": []}
SWAP = {"gpt-4o-mini": "gpt-4o"}
GPT_4O_PRICE = Price(input_per_mtok=2.5, output_per_mtok=10.0)


def ask(text: str) -> Any:
    return [{"role": "user", "content": text}]


@pytest.fixture
def gw(redis_url: str, keyring: Keyring) -> Iterator[Gateway]:
    """A gateway where the candidate's model has a price of its own."""
    models = [m.model_copy(update={"price": GPT_4O_PRICE}) if m.name == "gpt-4o" else m for m in make_settings().models]
    with start_gateway(make_settings(models=models), redis_url, keyring) as gateway:
        yield gateway
        assert_no_server_errors(gateway)


def settings_of(gw: Gateway) -> Settings:
    return gw.server.app[DEPS].settings


def mock_calls(gw: Gateway) -> int:
    return cast(MockProvider, gw.server.app[DEPS].providers["mock"]).calls


def record(gw: Gateway) -> tuple[str, list[str]]:
    """A chat session on the recorded plan: a question, a tool call, a stream, and a call in
    the Responses dialect. Returns its id and the text the client got for the two first answers."""
    opened = gw.open_session(RECORDED_PLAN)
    with sdk(gw, opened["token"]) as client:
        first = client.chat.completions.create(model="gpt-4o-mini", messages=ask("Where is order A-7?"))
        client.chat.completions.create(model="gpt-4o-mini", messages=ask("Look up A-7"),
                                       tools=[LOOKUP_TOOL])
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=ask("And the refund?"), stream=True,
                                                stream_options={"include_usage": True})
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        client.responses.create(model="gpt-4o-mini", input="Thanks")
    return opened["session_id"], [first.choices[0].message.content or "", streamed]


def evaluate(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    response = gw.admin.post("/admin/v1/plans/evaluate", json=body)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


def journal_kinds(redis_url: str, session_id: str) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(redis_keys.journal(session_id))  # type: ignore[assignment]  # sync client
        return [fields[b"kind"].decode() for _, fields in entries]
    finally:
        client.close()


def test_live_answers_of_the_candidates_model_stand_beside_the_recorded_ones_and_a_denied_request_is_not_sent(
    gw: Gateway, redis_url: str
) -> None:
    source, texts = record(gw)
    before_source, before_calls = gw.session(source), mock_calls(gw)
    report = evaluate(gw, {"plan": CANDIDATE, "sessions": [source], "model_map": SWAP, "live": {}})
    live = report["live"]
    assert live["cap_usd"] == "1.000000000" and live["cap_default"] and not live["stopped_by_cap"]
    rows = live["calls"]
    assert [r["status"] for r in rows] == ["run", "denied", "run", "not_replayable"]
    assert "recorded mode only" in rows[3]["reason"] and rows[3]["recorded"]["kind"] == "response"

    # The request the candidate denies (its tool is gone) is not sent: two provider calls.
    assert rows[1]["live"] is None and "tool_not_allowed" in rows[1]["reason"]
    assert mock_calls(gw) - before_calls == 2 == report["provider_calls"] == live["totals"]["sent"]

    for row, text, kind in zip((rows[0], rows[2]), texts, ("response", "stream"), strict=True):
        recorded, answer = row["recorded"], row["live"]
        assert (recorded["kind"], recorded["model"], recorded["text"]) == (kind, "gpt-4o-mini", text)
        assert (answer["kind"], answer["model"]) == (kind, "gpt-4o")
        assert answer["text"] and answer["text"] != recorded["text"]
        assert answer["cost_nanos"] == cost_nanos(answer["tok_in"], 2_500_000_000) + cost_nanos(answer["tok_out"], 10_000_000_000)
        assert recorded["cost_nanos"] > 0 and recorded["tok_out"] > 0 and answer["tok_out"] > 0

    # The live answer is what the candidate's model answers a client asking the same.
    candidate_session = gw.open_session(report["candidate_assembly_id"])
    with sdk(gw, candidate_session["token"]) as client:
        direct = client.chat.completions.create(model="gpt-4o", messages=ask("Where is order A-7?"))
    assert rows[0]["live"]["text"] == direct.choices[0].message.content

    # Totals: recorded against live spend, to the nano-dollar, and the journaled session.
    totals = live["totals"]
    assert [totals[k] for k in ("requests", "run", "answered", "skipped_denied", "not_replayable", "not_run")] == [
        4, 2, 2, 1, 1, 0]
    assert totals["recorded_spend_nanos"] == rows[0]["recorded"]["cost_nanos"] + rows[2]["recorded"]["cost_nanos"]
    [session] = live["sessions"]
    evaluation = gw.session(session["session_id"])
    assert totals["live_spend_nanos"] == evaluation["spent_nanos"] == sum(r["live"]["cost_nanos"] for r in (rows[0], rows[2]))
    assert evaluation["labels"] == {"evaluation_of": source} and evaluation["assembly_id"] == report["candidate_assembly_id"]
    assert evaluation["budget_usd"] == "1.000000000" and session["budget_is_cap"]
    assert journal_kinds(redis_url, session["session_id"]).count("request") == 2

    # Read-only: the recorded session is untouched, and the candidate is no version of the plan.
    after = gw.session(source)
    assert (after["spent_nanos"], after["requests"]) == (before_source["spent_nanos"], before_source["requests"])
    versions = gw.admin.get("/admin/v1/plans/live-bot/versions").json()["data"]
    assert [(v["assembly_id"] != report["candidate_assembly_id"], v["sessions"]) for v in versions] == [(True, 1)]
    assert gw.admin.get("/admin/v1/plans/live-bot").json()["evaluation"]["live"]["totals"] == totals


def worst_case_nanos(gw: Gateway, text: str) -> int:
    """What the reservation holds for one request of the candidate: its worst case."""
    assembly = compile_plan(parse_plan(CANDIDATE), settings_of(gw)).assembly
    body = {"model": "gpt-4o", "messages": ask(text)}
    grant = policy.authorize(assembly, Endpoint.CHAT, body, known_models=gw.server.app[DEPS].known_models)
    return estimate(grant.model, Endpoint.CHAT, grant.body, n=grant.n, max_tokens=grant.max_output_tokens).nanos


def ask_again(gw: Gateway, times: int) -> str:
    """A session asking the same question `times` times: the same worst case and the same answer."""
    opened = gw.open_session(RECORDED_PLAN)
    with sdk(gw, opened["token"]) as client:
        for _ in range(times):
            client.chat.completions.create(model="gpt-4o-mini", messages=ask("Status of A-9?"))
    session_id: str = opened["session_id"]
    return session_id


def test_the_cap_stops_a_live_run_through_the_reservation_across_sessions_and_the_report_says_where(
    gw: Gateway,
) -> None:
    first, second = ask_again(gw, 2), ask_again(gw, 3)
    body = {"plan": CANDIDATE, "model_map": SWAP}
    answer = evaluate(gw, {**body, "sessions": [first], "live": {}})["live"]["calls"][0]["live"]["cost_nanos"]
    worst = worst_case_nanos(gw, "Status of A-9?")
    # Two answers in the first session; the second session opens with what is left (the
    # worst case exactly): one answer, then the reservation refuses the next.
    cap = worst + 2 * answer
    before = mock_calls(gw)
    report = evaluate(gw, {**body, "sessions": [first, second], "live": {"budget_usd": cap / 1e9}})
    live = report["live"]
    assert live["cap_nanos"] == cap and not live["cap_default"]
    assert [s["budget_usd"] for s in live["sessions"]] == [live["cap_usd"], f"0.{worst:09d}"]
    assert live["stopped_by_cap"] and live["stopped_at"] == {"session_id": second, "index": 1}
    assert [(r["session_id"], r["status"]) for r in live["calls"]] == [
        (first, "run"), (first, "run"), (second, "run"), (second, "run"), (second, "not_run")]
    refused = live["calls"][3]
    assert refused["live"]["error"]["code"] == "budget_exceeded" and "cap" in refused["reason"]
    assert mock_calls(gw) - before == 3 == live["totals"]["sent"] == live["totals"]["answered"]
    assert live["totals"]["live_spend_nanos"] == 3 * answer <= cap
    assert sum(gw.session(s["session_id"])["spent_nanos"] for s in live["sessions"]) == 3 * answer


def test_the_cli_prints_the_answers_side_by_side_and_refuses_a_bad_cap(gw: Gateway, tmp_path: Path) -> None:
    source, texts = record(gw)
    (tmp_path / "next.yaml").write_text(yaml.safe_dump(CANDIDATE))
    url = ["plan", "--url", gw.base_url]
    args = [*url, "evaluate", str(tmp_path / "next.yaml"), "--sessions", source, "--model", "gpt-4o-mini=gpt-4o"]
    out = ok(*args, "--live", "--live-budget-usd", "0.5", "-o", str(tmp_path / "report.json")).stdout
    assert "stored for its evaluation sessions, not a version" in out
    assert "live: the candidate's answers beside the recorded ones, cap 0.500000000 USD" in out
    assert "2 run (2 answered), 1 skipped as denied, 1 not replayable, 0 not run" in out
    assert "the cap did not stop the run" in out
    lines = out.splitlines()
    at = lines.index(f"  {source} #0 run")
    assert lines[at + 1].split()[:3] == ["recorded", "response", "gpt-4o-mini"] and texts[0][:40].replace("\n", " ") in lines[at + 1]
    assert lines[at + 2].split()[:3] == ["live", "response", "gpt-4o"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["live"]["cap_usd"] == "0.500000000" and report["live"]["totals"]["run"] == 2

    # Without --live nothing is sent, and the report has no live part.
    before = mock_calls(gw)
    assert "not stored; no provider called" in ok(*args).stdout and mock_calls(gw) == before
    bad = run(*args, "--live", "--live-budget-usd", "-1")
    assert bad.returncode == 2 and "HTTP 400" in bad.stderr and "live.budget_usd" in bad.stderr
    assert run(*args, "--live-budget-usd", "1").returncode == 2
    assert run(*args, "--live", "--model", "gpt-4o").returncode == 2
    assert mock_calls(gw) == before


BAD_LIVE: list[Any] = [
    {"budget_usd": -1}, {"budget_usd": 0}, {"budget_usd": "1"}, {"budget_usd": True},
    {"budget_usd": 1e-12}, {"budget_usd": 1e9}, {"budget": 1}, "yes", True, [],
]


def test_a_bad_live_spec_is_a_400_and_nothing_runs(gw: Gateway) -> None:
    source, _ = record(gw)
    before = mock_calls(gw)
    for live in BAD_LIVE:
        response = gw.admin.post("/admin/v1/plans/evaluate", json={"plan": CANDIDATE, "sessions": [source], "live": live})
        assert openai_error(response, 400)["param"].startswith("live"), live
    assert mock_calls(gw) == before
    assert gw.admin.get("/admin/v1/plans/live-bot").json()["evaluation"] is None


def test_a_bad_model_map_is_a_400(gw: Gateway) -> None:
    def post(model_map: Any) -> httpx.Response:
        return gw.admin.post("/admin/v1/plans/evaluate", json={"plan": CANDIDATE, "sessions": [], "model_map": model_map})

    assert openai_error(post({"gpt-4o-mini": 4}), 400)["param"].startswith("model_map")
    assert openai_error(post(["gpt-4o"]), 400)["param"] == "model_map"
    assert openai_error(post({"": "gpt-4o"}), 400)["param"].startswith("model_map")
