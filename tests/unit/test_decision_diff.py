"""The decision plane without a gateway: the semantic diff of two known Assemblies, plans
rebuilt from Assemblies, and the percentile the suggestions quote."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.assembly.compile import compile_plan
from gateway.assembly.model import Assembly
from gateway.assembly.plan import load_plan_file, parse_plan, parse_plan_yaml
from gateway.decision.diff import diff_assemblies
from gateway.decision.planfile import plan_data, plan_from_assembly, plan_yaml
from gateway.decision.suggest import percentile
from gateway.settings import Settings
from tests.conftest import ROOT, make_settings

LOOKUP = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
BASE: dict[str, Any] = {
    "name": "diffed",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 512, "params": {"temperature": 0, "top_p": 1}}],
    "tools": [
        {"name": "lookup_order", "description": "Find an order", "parameters": LOOKUP},
        {"name": "refund_order", "parameters": {"type": "object", "properties": {}}},
    ],
    "budget": {"usd": 1.0, "requests": 100},
    "limits": {"session_rpm": 60},
    "steps": [
        {"id": "triage", "model": "gpt-4o-mini", "next": ["answer"]},
        {"id": "answer", "model": "gpt-4o-mini", "tools": ["lookup_order"], "next": []},
    ],
}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return make_settings()


def _compiled(plan: dict[str, Any], settings: Settings) -> Assembly:
    return compile_plan(parse_plan(plan), settings).assembly


def _changed_plan() -> dict[str, Any]:
    plan = copy.deepcopy(BASE)
    plan["models"][0]["max_tokens"] = 128
    plan["models"][0]["params"] = {"temperature": 0.5, "seed": 7}
    plan["models"].append({"name": "local-llama", "max_tokens": 64})
    plan["tools"] = [
        {"name": "lookup_order", "description": "Find an order",
         "parameters": {**LOOKUP, "properties": {"order_id": {"type": "integer"}}}},
        {"name": "cancel_order", "parameters": {"type": "object", "properties": {}}},
    ]
    plan["budget"] = {"usd": 0.25, "requests": 100}
    plan["limits"] = {"session_rpm": 30}
    plan["steps"][1]["next"] = ["answer", "wrap"]
    plan["steps"].append({"id": "wrap", "model": "local-llama", "next": []})
    return plan


def test_the_diff_of_two_known_assemblies_lists_every_change_by_meaning(settings: Settings) -> None:
    a, b = _compiled(BASE, settings), _compiled(_changed_plan(), settings)
    got = [(c.kind, c.path, c.before, c.after) for c in diff_assemblies(a, b)]
    worst_before, worst_after = a.steps[0].worst_case_nanos, b.steps[0].worst_case_nanos
    assert got == [
        ("model_added", "models.local-llama", None, "llama-3.1-8b-instruct"),
        ("cap_changed", "models.gpt-4o-mini.max_tokens", 512, 128),
        ("param_pinned", "models.gpt-4o-mini.params.seed", None, 7),
        ("param_changed", "models.gpt-4o-mini.params.temperature", 0, 0.5),
        ("param_unpinned", "models.gpt-4o-mini.params.top_p", 1, None),
        ("tool_removed", "tools.refund_order", {"type": "object", "properties": {}}, None),
        ("tool_added", "tools.cancel_order", None, {"type": "object", "properties": {}}),
        ("tool_schema_changed", "tools.lookup_order.parameters", LOOKUP,
         {**LOOKUP, "properties": {"order_id": {"type": "integer"}}}),
        ("step_added", "steps.wrap", None, "local-llama"),
        ("step_changed", "steps.triage.worst_case_nanos", worst_before, worst_after),
        ("transition_added", "steps.answer.next", None, "answer->answer"),
        ("transition_added", "steps.answer.next", None, "answer->wrap"),
        ("step_changed", "steps.answer.worst_case_nanos", worst_before, worst_after),
        ("budget_changed", "budget.usd_nanos", 1_000_000_000, 250_000_000),
        ("limit_changed", "limits.session_rpm", 60, 30),
    ]
    assert diff_assemblies(a, a) == []


def test_a_price_change_in_the_settings_shows_as_a_price_change(settings: Settings) -> None:
    models = [m if m.name != "gpt-4o-mini" else m.model_copy(update={"price": m.price.model_copy(  # type: ignore[union-attr]
        update={"output_per_mtok": 1.2})}) for m in settings.models]
    dearer = settings.model_copy(update={"models": models})
    changes = diff_assemblies(_compiled(BASE, settings), _compiled(BASE, dearer))
    prices = [c for c in changes if c.kind == "price_changed"]
    assert [(c.path, c.before, c.after) for c in prices] == [
        ("models.gpt-4o-mini.price.output_nanos_per_mtok", 600_000_000, 1_200_000_000)
    ]
    assert "0.600000000 -> 1.200000000 USD per million tokens" in prices[0].summary


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "plans").glob("*.yaml")), ids=lambda p: p.name)
def test_a_plan_rebuilt_from_its_assembly_compiles_back_to_the_same_assembly(path: Path, settings: Settings) -> None:
    assembly = compile_plan(load_plan_file(path), settings).assembly
    rebuilt = plan_yaml(plan_from_assembly(assembly))
    assert compile_plan(parse_plan_yaml(rebuilt), settings).assembly.id == assembly.id


def test_a_stored_plan_compiles_back_to_the_same_assembly(settings: Settings) -> None:
    plan = parse_plan(BASE)
    data = yaml.safe_load(plan_yaml(plan_data(plan), header=["a comment"]))
    assert compile_plan(parse_plan(data), settings).assembly.id == compile_plan(plan, settings).assembly.id


def test_percentiles_are_nearest_rank() -> None:
    values = [5, 1, 4, 2, 3, 10, 9, 8, 7, 6]
    assert [percentile(values, p) for p in (1, 50, 90, 95, 99, 100)] == [1, 5, 9, 10, 10, 10]
    assert percentile([42], 95) == 42
