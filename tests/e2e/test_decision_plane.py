"""The decision plane against a real gateway: sessions driven with the official SDK and the
mock provider leave a known pattern in their journals (short answers, a tool never called,
one transition denied again and again, spend far under the budget); the suggestions name
each change with its numbers, compiling them makes a new version, and evaluations replay
recorded requests through candidates without calling any provider."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import yaml

from gateway import redis_keys
from gateway.capability import Keyring
from gateway.http.keys import DEPS
from gateway.money import cost_nanos
from gateway.providers.mock import MockProvider
from gateway.settings import Price, Settings
from tests.conftest import BOTH_REDIS, Gateway, make_settings, start_gateway
from tests.e2e.test_cli import ok, run
from tests.openai_support import openai_error, sdk
from tests.redis_proc import client_for

LOOKUP = {
    "name": "lookup_order",
    "description": "Find an order by id",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}
LOOKUP_TOOL: Any = {"type": "function", "function": LOOKUP}
PLAN: dict[str, Any] = {
    "name": "decision-bot",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 512, "params": {"temperature": 0}}],
    "tools": [LOOKUP, {"name": "refund_order", "description": "Refund", "parameters": {"type": "object", "properties": {}}}],
    "budget": {"usd": 1, "tokens": 200000, "requests": 100},
    "steps": [
        {"id": "triage", "model": "gpt-4o-mini", "tools": [], "next": ["answer"]},
        {"id": "answer", "model": "gpt-4o-mini", "tools": ["lookup_order"], "next": ["escalate"]},
        {"id": "escalate", "model": "gpt-4o-mini", "tools": ["refund_order"], "next": []},
    ],
}
SESSIONS = 3


def ask(text: str) -> Any:
    return [{"role": "user", "content": text}]


def drive(gw: Gateway, assembly_id: str, i: int) -> str:
    """triage, answer, then answer again twice: the plan has no answer -> answer edge."""
    opened = gw.open_session(assembly_id)
    with sdk(gw, opened["token"]) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=ask(f"Order A-{i} is late, customer {i}."))
        client.chat.completions.create(model="gpt-4o-mini", messages=ask(f"Look up A-{i}"), tools=[LOOKUP_TOOL])
        for attempt in range(2):
            with pytest.raises(openai.ConflictError):
                client.chat.completions.create(model="gpt-4o-mini", messages=ask(f"Again A-{i} {attempt}"), tools=[LOOKUP_TOOL])
    session_id: str = opened["session_id"]
    return session_id


def nearest_rank(values: list[int], p: int) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(p * len(ordered) / 100) - 1]


def journal(redis_url: str, session_id: str) -> list[dict[str, str]]:
    """A session's journal entries in order, without their bodies."""
    client = client_for(redis_url)
    try:
        raw = client.xrange(redis_keys.journal(session_id))
    finally:
        client.close()
    return [{k.decode(): v.decode() for k, v in fields.items() if k != b"body"} for _, fields in raw]


def answers(redis_url: str, sessions: list[str]) -> dict[str, list[dict[str, str]]]:
    return {s: [e for e in journal(redis_url, s) if e["kind"] == "response"] for s in sessions}


@pytest.fixture
def recorded(gw: Gateway) -> tuple[str, list[str]]:
    assembly_id = gw.compile(PLAN)
    return assembly_id, [drive(gw, assembly_id, i) for i in range(SESSIONS)]


def get(gw: Gateway, path: str, status: int = 200) -> Any:
    response = gw.admin.get(path)
    assert response.status_code == status, response.text
    return response.json()


def by_kind(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["kind"] + ":" + c["path"]: c for c in report["changes"]}


def test_suggestions_name_each_change_with_the_numbers_from_the_journal(
    gw: Gateway, redis_url: str, recorded: tuple[str, list[str]]
) -> None:
    assembly_id, sessions = recorded
    report = get(gw, "/admin/v1/plans/decision-bot/suggestions")
    assert report["assembly_id"] == assembly_id and report["sessions"] == SESSIONS and report["calls"] == 2 * SESSIONS
    changes = by_kind(report)
    found = answers(redis_url, sessions)
    outputs = [int(e["tok_out"]) for entries in found.values() for e in entries]
    cap = changes["max_tokens:models.gpt-4o-mini.max_tokens"]
    assert cap["evidence"]["p99"] == max(outputs) and cap["evidence"]["answers"] == 6
    assert cap["after"] == math.ceil(math.ceil(max(outputs) * 1.25) / 16) * 16 and cap["action"] == "apply"

    assert changes["tool_unused:tools.refund_order"]["action"] == "apply"
    assert not any(key.endswith("tools.lookup_order") for key in changes)  # offered and called
    assert changes["step_never_reached:steps.escalate"]["action"] == "review"
    edge = changes["transition_added:steps.answer.next"]
    assert edge["after"] == "answer->answer" and edge["evidence"] == {"denied": 6, "sessions": sorted(sessions)}

    spent = [sum(int(e["cost_nanos"]) for e in found[s]) for s in sessions]
    usd = changes["budget_usd:budget.usd"]
    assert usd["evidence"]["p95"] == max(spent) == nearest_rank(spent, 95)
    assert usd["after"] == "0.010000000" and usd["before"] == "1.000000000"  # 1.5 x p95, up to a cent
    tokens = [sum(int(e["tok_in"]) + int(e["tok_out"]) for e in found[s]) for s in sessions]
    assert changes["budget_tokens:budget.tokens"]["after"] == str(math.ceil(max(tokens) * 1.5 / 1000) * 1000)
    assert changes["budget_requests:budget.requests"]["after"] == "6"  # 2 admitted + 2 denied by step, x 1.5

    cheaper = changes["cheaper_model:models.gpt-4o-mini"]
    usage = [(int(e["tok_in"]), int(e["tok_out"])) for entries in found.values() for e in entries]
    assert cheaper["after"] == "local-llama" and cheaper["action"] == "review"
    assert cheaper["evidence"]["cost_nanos"] == sum(spent)
    assert cheaper["evidence"]["cost_at_alternative_nanos"] == sum(
        cost_nanos(i, 50_000_000) + cost_nanos(o, 80_000_000) for i, o in usage)

    revised = yaml.safe_load(report["yaml"])
    assert revised == report["revised_plan"]
    assert [t["name"] for t in revised["tools"]] == ["lookup_order"]
    assert revised["steps"][1]["next"] == ["escalate", "answer"] and revised["budget"]["usd"] == 0.01


@BOTH_REDIS  # also on a Redis Cluster
def test_compiling_the_suggestion_makes_a_new_version_and_leaves_running_sessions_alone(
    gw: Gateway, recorded: tuple[str, list[str]]
) -> None:
    old, _ = recorded
    revised = yaml.safe_load(get(gw, "/admin/v1/plans/decision-bot/suggestions")["yaml"])
    running = gw.open_session(old)
    response = gw.admin.post("/admin/v1/plans/compile", json=revised, headers={"x-abc-actor": "alice"})
    assert response.status_code == 201, response.text
    new = response.json()
    assert new["version"] == 2 and new["parent"] == old and new["assembly_id"] != old

    lineage = get(gw, "/admin/v1/plans/decision-bot/versions")["data"]
    assert [(v["version"], v["assembly_id"], v["parent"], v["sessions"]) for v in lineage] == [
        (1, old, None, SESSIONS + 1), (2, new["assembly_id"], old, 0)]
    assert lineage[1]["compiled_by"] == "admin" and lineage[1]["actor"] == "alice"
    assert gw.admin.post("/admin/v1/plans/compile", json=revised).json()["version"] == 2  # no duplicate
    assert len(get(gw, "/admin/v1/plans/decision-bot/versions")["data"]) == 2

    # The running session keeps its Assembly: no answer -> answer edge, the old budget.
    assert gw.session(running["session_id"])["assembly_id"] == old
    assert gw.session(running["session_id"])["budget_usd"] == "1.000000000"
    with sdk(gw, running["token"]) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=ask("hi"))
        client.chat.completions.create(model="gpt-4o-mini", messages=ask("look"), tools=[LOOKUP_TOOL])
        with pytest.raises(openai.ConflictError):
            client.chat.completions.create(model="gpt-4o-mini", messages=ask("again"), tools=[LOOKUP_TOOL])
    assert gw.admin.get(f"/admin/v1/assemblies/{old}").status_code == 200


def test_the_admin_token_label_and_a_bad_actor_header(settings: Settings, redis_url: str, keyring: Keyring) -> None:
    with start_gateway(settings.model_copy(update={"admin_token_label": "ops-team"}), redis_url, keyring) as gw:
        gw.compile(PLAN)
        assert get(gw, "/admin/v1/plans/decision-bot/versions")["data"][0]["compiled_by"] == "ops-team"
        bad = gw.admin.post("/admin/v1/plans/compile", json=PLAN, headers={"x-abc-actor": "has space"})
        assert openai_error(bad, 400)["param"] == "x-abc-actor"
        assert openai_error(gw.admin.get("/admin/v1/plans/nope/versions"), 404)["code"] == "plan_not_found"


def test_recompiling_records_nothing_and_compiling_an_older_plan_is_a_revert(gw: Gateway) -> None:
    first = gw.compile(PLAN)
    second = gw.compile({**PLAN, "budget": {"usd": 2}})
    assert gw.compile(PLAN) == first and gw.compile(PLAN) == first
    gw.open_session(first)
    lineage = get(gw, "/admin/v1/plans/decision-bot/versions")["data"]
    assert [(v["version"], v["assembly_id"], v["parent"], v["sessions"]) for v in lineage] == [
        (1, first, None, 1), (2, second, first, 0), (3, first, second, 1)]


# --- evaluate ------------------------------------------------------------------------------

EVAL_PLAN: dict[str, Any] = {
    "name": "eval-bot",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 512}],
    "tools": [LOOKUP],
    "budget": {"usd": 1},
}
# Explicit max_tokens of each recorded call (None: left to the cap).
EXPLICIT: list[int | None] = [300, None, None, None, 40]


@pytest.fixture
def eval_session(gw: Gateway) -> str:
    opened = gw.open_session(EVAL_PLAN)
    with sdk(gw, opened["token"]) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=ask("Tell me about shipping"), max_tokens=300)
        client.chat.completions.create(model="gpt-4o-mini", messages=ask("Find A-7"), tools=[LOOKUP_TOOL])
        client.chat.completions.create(model="gpt-4o-mini", messages=ask("Describe the returns policy in detail"))
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=ask("And refunds?"), stream=True,
                                                stream_options={"include_usage": True})
        for _ in stream:
            pass
        client.chat.completions.create(model="gpt-4o-mini", messages=ask("Short one"), max_tokens=40)
    session_id: str = opened["session_id"]
    return session_id


def mock_calls(gw: Gateway) -> int:
    return cast(MockProvider, gw.server.app[DEPS].providers["mock"]).calls


def evaluate(gw: Gateway, plan: dict[str, Any], sessions: list[str]) -> dict[str, Any]:
    before = mock_calls(gw)
    response = gw.admin.post("/admin/v1/plans/evaluate", json={"plan": plan, "sessions": sessions})
    assert response.status_code == 200, response.text
    assert mock_calls(gw) == before  # no provider was called
    report: dict[str, Any] = response.json()
    return report


def outcomes(redis_url: str, session_id: str) -> list[dict[str, str]]:
    return [e for e in journal(redis_url, session_id) if e["kind"] in ("response", "stream")]


def test_a_tighter_cap_reports_exactly_the_calls_that_would_exceed_it(
    gw: Gateway, redis_url: str, eval_session: str
) -> None:
    out = [int(e["tok_out"]) for e in outcomes(redis_url, eval_session)]
    cap = min(out[2], out[3]) - 1
    assert 1 <= cap < 40
    candidate = copy.deepcopy(EVAL_PLAN)
    candidate["models"][0]["max_tokens"] = cap
    report = evaluate(gw, candidate, [eval_session])
    calls = report["calls"]
    denied = [i for i, m in enumerate(EXPLICIT) if m is not None and m > cap]
    assert [c["index"] for c in calls if c["verdict"] == "denied"] == denied == [0, 4]
    assert all(calls[i]["rule"] == "max_tokens_cap" and calls[i]["code"] == "capability_denied" for i in denied)
    truncated = [i for i, o in enumerate(out) if i not in denied and o > cap]
    assert [c["index"] for c in calls if c["truncated_from"] is not None] == truncated
    assert all(calls[i]["tok_out"] == cap and calls[i]["truncated_from"] == out[i] for i in truncated)
    assert report["sessions"][0]["newly_denied"] == denied


def test_a_removed_tool_reports_the_calls_that_used_it(gw: Gateway, eval_session: str) -> None:
    candidate = {**EVAL_PLAN, "tools": []}
    spent = gw.session(eval_session)["spent_nanos"]
    report = evaluate(gw, candidate, [eval_session])
    denied = [c for c in report["calls"] if c["verdict"] == "denied"]
    assert [(c["index"], c["rule"]) for c in denied] == [(1, "tool_not_allowed")]
    assert "lookup_order" in denied[0]["reason"]
    # Read-only: the candidate is not stored, the session is untouched.
    listed = [a["assembly_id"] for a in get(gw, "/admin/v1/assemblies")["data"]]
    assert report["candidate_assembly_id"] not in listed
    assert gw.session(eval_session)["spent_nanos"] == spent


def test_a_candidate_without_an_edge_reports_the_steps_that_break(
    gw: Gateway, recorded: tuple[str, list[str]]
) -> None:
    _, sessions = recorded
    candidate = copy.deepcopy(PLAN)
    # A new entry step: the plain first call lands there, and no answer may follow it.
    candidate["steps"].insert(0, {"id": "greet", "model": "gpt-4o-mini", "tools": [], "next": ["triage"]})
    report = evaluate(gw, candidate, sessions)
    for summary in report["sessions"]:
        assert summary["broken_steps"] == [1, 2, 3] and summary["newly_denied"] == [1]
    broken = [c for c in report["calls"] if c["index"] == 1]
    assert {(c["code"], c["rule"]) for c in broken} == {("step_not_allowed", "step_not_allowed")}
    assert "allowed: triage" in broken[0]["reason"]
    assert {c["step"] for c in report["calls"] if c["index"] == 0} == {"greet"}


@BOTH_REDIS  # also on a Redis Cluster
def test_higher_prices_report_the_spend_to_the_nano_dollar(
    gw: Gateway, redis_url: str, keyring: Keyring, eval_session: str
) -> None:
    recorded = outcomes(redis_url, eval_session)
    models = [m.model_copy(update={"price": Price(input_per_mtok=1.5, output_per_mtok=6.0)})
              if m.name == "gpt-4o-mini" else m for m in make_settings().models]
    with start_gateway(make_settings(models=models), redis_url, keyring) as dearer:
        report = evaluate(dearer, EVAL_PLAN, [eval_session])
    expected = sum(cost_nanos(int(e["tok_in"]), 1_500_000_000) + cost_nanos(int(e["tok_out"]), 6_000_000_000)
                   for e in recorded)
    actual = sum(int(e["cost_nanos"]) for e in recorded)
    assert report["totals"]["spend_nanos"] == expected
    assert report["totals"]["spend_actual_nanos"] == actual == gw.session(eval_session)["spent_nanos"]
    assert [c["cost"] for c in report["calls"]] == [
        cost_nanos(int(e["tok_in"]), 1_500_000_000) + cost_nanos(int(e["tok_out"]), 6_000_000_000) for e in recorded]
    assert report["totals"]["sessions_out_of_budget"] == []


def test_a_smaller_budget_reports_the_sessions_that_would_run_out(gw: Gateway, eval_session: str) -> None:
    report = evaluate(gw, {**EVAL_PLAN, "budget": {"usd": 1, "requests": 2}}, [eval_session])
    summary = report["sessions"][0]
    assert summary["ran_out_of_budget"] and summary["ran_out_at"] == 2
    assert report["totals"]["sessions_out_of_budget"] == [eval_session]
    assert [c["code"] for c in report["calls"]][2:] == ["budget_exceeded"] * 3


def test_evaluating_the_suggestion_shows_the_denied_transitions_allowed(
    gw: Gateway, recorded: tuple[str, list[str]]
) -> None:
    _, sessions = recorded
    revised = yaml.safe_load(get(gw, "/admin/v1/plans/decision-bot/suggestions")["yaml"])
    before = mock_calls(gw)
    response = gw.admin.post("/admin/v1/plans/evaluate", json={"plan": revised, "sessions_of": "decision-bot"})
    assert response.status_code == 200, response.text
    assert mock_calls(gw) == before
    report = response.json()
    assert report["totals"]["newly_allowed"] == 2 * SESSIONS and report["totals"]["newly_denied"] == 0
    assert sorted(s["session_id"] for s in report["sessions"]) == sorted(sessions)
    page = get(gw, "/admin/v1/plans/decision-bot")
    assert page["evaluation"]["candidate_assembly_id"] == report["candidate_assembly_id"]
    assert page["suggestions"]["plan"] == "decision-bot" and page["versions"][0]["version"] == 1


def test_bad_evaluations_are_openai_shaped_errors(gw: Gateway) -> None:
    def post(body: Any) -> httpx.Response:
        return gw.admin.post("/admin/v1/plans/evaluate", json=body)

    assert openai_error(post({"plan": EVAL_PLAN}), 400)["param"] == "sessions"
    assert openai_error(post({"plan": {"name": "x"}, "sessions": []}), 422)["code"] == "plan_invalid"
    assert openai_error(post({"plan": EVAL_PLAN, "sessions": ["sess_00000000"]}), 404)["code"] == "session_not_found"
    assert openai_error(post({"plan": EVAL_PLAN, "sessions": ["bad id"]}), 400)["param"].startswith("sessions")
    assert openai_error(gw.admin.get("/admin/v1/assemblies/asm_x/diff/asm_y"), 404)["code"] == "assembly_not_found"



def test_the_plan_commands_walk_suggest_evaluate_compile(
    gw: Gateway, recorded: tuple[str, list[str]], tmp_path: Path
) -> None:
    old, sessions = recorded
    url = ["plan", "--url", gw.base_url]
    suggested = ok(*url, "suggest", "decision-bot", "-o", str(tmp_path / "next.yaml")).stdout
    assert "[apply] transition answer -> answer denied 6 times in 3 session(s)" in suggested
    assert yaml.safe_load((tmp_path / "next.yaml").read_text()) == yaml.safe_load(suggested)

    evaluated = ok(*url, "evaluate", str(tmp_path / "next.yaml"), "--sessions", ",".join(sessions),
                   "-o", str(tmp_path / "report.json")).stdout
    assert "3 session(s), 12 call(s): 12 allowed, 0 denied (0 newly), 6 newly allowed" in evaluated
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"]["calls"] == 12 and report["provider_calls"] == 0

    compiled = json.loads(ok("admin", "--url", gw.base_url, "compile", str(tmp_path / "next.yaml")).stdout)
    assert compiled["version"] == 2 and compiled["parent"] == old
    versions = ok(*url, "versions", "decision-bot").stdout.splitlines()
    assert versions[0] == "plan decision-bot: 2 version(s)"
    assert versions[4].split()[:3] == ["2", compiled["assembly_id"], old]
    diff = ok(*url, "diff", old, compiled["assembly_id"]).stdout
    assert "transition_added       transition answer -> answer added" in diff
    assert "tool_removed           tool refund_order removed" in diff
    assert run(*url, "versions", "no-such-plan").returncode == 2
