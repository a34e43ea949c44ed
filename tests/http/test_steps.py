"""A plan with steps makes its session a state machine: requests in order advance it, a
request that fits no step allowed next is a 409 naming the allowed steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import ROOT, Gateway
from tests.openai_support import bearer, journal, openai_error, sdk

PLANS = ROOT / "config" / "plans"
HELLO = [{"role": "user", "content": "where is my order?"}]
LOOKUP_ORDER = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}


def _plan(name: str) -> dict[str, Any]:
    plan: dict[str, Any] = yaml.safe_load(Path(PLANS / f"{name}.yaml").read_text())
    return plan



@pytest.fixture
def support(gw: Gateway) -> dict[str, Any]:
    return gw.open_session(_plan("support-bot"))


def _triage(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)


def _answer(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, tools=[LOOKUP_ORDER])


def _conflict(client: openai.OpenAI, **request: Any) -> openai.ConflictError:
    with pytest.raises(openai.ConflictError) as caught:
        client.chat.completions.create(**{"model": "gpt-4o-mini", "messages": HELLO, **request})
    assert caught.value.status_code == 409
    return caught.value


def test_the_example_plan_compiles_to_the_same_assembly_every_time(gw: Gateway) -> None:
    plan = _plan("support-bot")
    first = gw.compile(plan)
    reordered = dict(reversed(list(plan.items())))
    assert gw.compile(reordered) == first
    assembly = gw.admin.get(f"/admin/v1/assemblies/{first}").json()
    assert [s["id"] for s in assembly["steps"]] == ["triage", "answer"]


def test_steps_in_order_succeed_and_advance_the_session(
    gw: Gateway, support: dict[str, Any]
) -> None:
    client = sdk(gw, support["token"])
    assert gw.session(support["session_id"])["current_step"] is None
    _triage(client)
    assert gw.session(support["session_id"])["current_step"] == "triage"
    _answer(client)
    assert gw.session(support["session_id"])["current_step"] == "answer"
    _answer(client)  # answer -> answer is allowed
    shown = gw.session(support["session_id"])
    assert shown["current_step"] == "answer" and shown["requests"] == 3


def test_starting_with_a_later_step_is_409_naming_the_first(
    gw: Gateway, support: dict[str, Any], redis_url: str
) -> None:
    client = sdk(gw, support["token"])
    error = _conflict(client, tools=[LOOKUP_ORDER])
    assert "triage" in error.message
    body = error.response.json()["error"]
    assert body["allowed_steps"] == ["triage"] and body["type"] == "conflict_error"
    shown = gw.session(support["session_id"])
    assert shown["current_step"] is None and shown["requests"] == 0 and shown["spent_nanos"] == 0
    last = journal(redis_url, support["session_id"])[-1]
    assert (last["kind"], last["status"]) == ("denial", "409")


def test_a_request_fitting_several_steps_takes_the_one_allowed_next(
    gw: Gateway, support: dict[str, Any]
) -> None:
    # No tools fits both triage (tools: []) and answer (tools: [lookup_order]); after
    # triage only answer may come, so that is the step recorded.
    client = sdk(gw, support["token"])
    _triage(client)
    _triage(client)
    assert gw.session(support["session_id"])["current_step"] == "answer"


def test_out_of_order_stream_is_a_plain_409_before_any_event(
    gw: Gateway, support: dict[str, Any]
) -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO, "stream": True, "tools": [LOOKUP_ORDER]}
    response = httpx.post(
        gw.openai_base + "/chat/completions", json=body, headers=bearer(support["token"])
    )
    assert "triage" in openai_error(response, 409)["message"]


def test_a_terminal_step_allows_nothing_after_it(gw: Gateway) -> None:
    plan = {
        "name": "two-models",
        "models": [{"name": "gpt-4o-mini", "max_tokens": 64}, {"name": "gpt-4o", "max_tokens": 64}],
        "budget": {"usd": 1},
        "steps": [
            {"id": "extract", "model": "gpt-4o-mini", "next": ["summarize"]},
            {"id": "summarize", "model": "gpt-4o"},
        ],
    }
    opened = gw.open_session(plan)
    client = sdk(gw, opened["token"])
    assert "extract" in _conflict(client, model="gpt-4o").message
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    error = _conflict(client, model="gpt-4o")
    assert error.response.json()["error"]["allowed_steps"] == []
    assert gw.session(opened["session_id"])["current_step"] == "summarize"


def test_a_failed_call_does_not_advance_the_step(gw: Gateway) -> None:
    plan = {
        "name": "cut-second",
        "models": [
            {"name": "gpt-4o-mini", "max_tokens": 64},
            {"name": "mock-cut", "max_tokens": 64},
        ],
        "budget": {"usd": 1},
        "steps": [
            {"id": "first", "model": "gpt-4o-mini", "next": ["second"]},
            {"id": "second", "model": "mock-cut", "next": ["first"]},
        ],
    }
    opened = gw.open_session(plan)
    client = sdk(gw, opened["token"])
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    body = {"model": "mock-cut", "messages": HELLO, "stream": True}
    streamed = httpx.post(
        gw.openai_base + "/chat/completions", json=body, headers=bearer(opened["token"])
    )
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert gw.session(opened["session_id"])["current_step"] == "first"
    assert "second" in _conflict(client).message  # still owed: the step that failed


def test_models_lists_only_the_plans_models(gw: Gateway, support: dict[str, Any]) -> None:
    ids = [m.id for m in sdk(gw, support["token"]).models.list()]
    assert ids == ["gpt-4o-mini"]


def test_the_plans_pinned_temperature_holds_in_every_step(
    gw: Gateway, support: dict[str, Any]
) -> None:
    client = sdk(gw, support["token"])
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, temperature=1)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=513)
    _triage(client)
    assert gw.session(support["session_id"])["current_step"] == "triage"
