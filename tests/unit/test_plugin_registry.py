"""Plugins are plan decisions: selected by name, options validated at compile time, frozen
into the Assembly and its id, and built per (Assembly, steps) on a replica that has them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.assembly.compile import compile_plan
from gateway.assembly.model import Assembly
from gateway.assembly.plan import PlanInvalid, parse_plan, parse_plan_yaml
from gateway.errors import ServiceUnavailable
from gateway.plugins import ENTRY_POINT_GROUP, Registry, Run, for_call
from tests.conftest import make_settings

SETTINGS = make_settings()
REGISTRY = Registry.from_entry_points()
BASE: dict[str, Any] = {
    "name": "guarded",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 64}],
    "tools": [{"name": "lookup_order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}],
}
STEPS: list[dict[str, Any]] = [
    {"id": "triage", "model": "gpt-4o-mini", "next": ["answer"]},
    {"id": "answer", "model": "gpt-4o-mini", "tools": ["lookup_order"], "next": ["answer"],
     "plugins": [{"name": "output_limits", "options": {"max_tool_calls": 1}}]},
]


def compiled(**plan: Any) -> Assembly:
    return compile_plan(parse_plan({**BASE, **plan}), SETTINGS, registry=REGISTRY).assembly


def problems(**plan: Any) -> dict[str, str]:
    with pytest.raises(PlanInvalid) as caught:
        compile_plan(parse_plan({**BASE, **plan}), SETTINGS, registry=REGISTRY)
    return {p.path: p.message for p in caught.value.problems}


def test_the_shipped_plugins_are_registered_as_entry_points() -> None:
    assert {"pii_redact", "prompt_guard", "output_limits"} <= set(REGISTRY.names())
    assert ENTRY_POINT_GROUP == "abc_gateway.plugins"


def test_a_selected_plugin_is_frozen_with_its_version_and_validated_options() -> None:
    assembly = compiled(plugins=[{"name": "PII_Redact", "options": {"answers": True}}])
    (grant,) = assembly.plugins
    assert (grant.name, grant.version, grant.options) == ("pii_redact", "1.0.0", {"answers": True})
    guard = compiled(plugins=[{"name": "prompt_guard"}]).plugins[0]
    assert guard.options["phrases"] is True and guard.options["deny_patterns"] == []  # defaults are frozen too


def test_the_plugin_list_and_options_change_the_assembly_id() -> None:
    ids = {
        compiled().id,
        compiled(plugins=[{"name": "pii_redact"}]).id,
        compiled(plugins=[{"name": "pii_redact", "options": {"answers": True}}]).id,
        compiled(plugins=[{"name": "pii_redact"}, {"name": "prompt_guard"}]).id,
        compiled(plugins=[{"name": "prompt_guard"}, {"name": "pii_redact"}]).id,
        compiled(steps=STEPS).id,
        compiled(steps=[STEPS[0], {**STEPS[1], "plugins": []}]).id,
    }
    assert len(ids) == 7
    # No plugins is no key at all: Assemblies compiled before plugins existed keep their ids.
    assert b"plugins" not in compiled(steps=[STEPS[0], {**STEPS[1], "plugins": []}]).canonical_json()


@pytest.mark.parametrize(("plugins", "path", "says"), [
    ([{"name": "nope"}], "plugins.0.name", "unknown plugin 'nope'"),
    ([{"name": "plugins.pii:PiiRedaction"}], "plugins.0.name", "must be"),  # never an import path
    ([{"name": "pii_redact", "options": {"answer": True}}], "plugins.0.options.answer", "Extra inputs"),
    ([{"name": "output_limits", "options": {"max_chars": 0}}], "plugins.0.options.max_chars", "greater than"),
    ([{"name": "prompt_guard", "options": {"deny_patterns": ["ok", "(unclosed"]}}], "plugins.0.options.deny_patterns.1", "regular expression"),
    ([{"name": "pii_redact"}, {"name": "pii_redact"}], "plugins.1.name", "listed twice"),
])
def test_an_unknown_plugin_or_bad_options_is_a_problem_with_its_path(plugins: list[dict[str, Any]], path: str, says: str) -> None:
    found = problems(plugins=plugins)
    assert path in found and says in found[path], found


def test_a_step_plugin_problem_names_the_step() -> None:
    steps = [STEPS[0], {**STEPS[1], "plugins": [{"name": "output_limits", "options": {"max_tool_calls": "many"}}]}]
    assert "steps.1.plugins.0.options.max_tool_calls" in problems(steps=steps)


def test_a_call_runs_the_plan_plugins_then_its_candidate_steps_and_the_chain_is_cached() -> None:
    assembly = compiled(plugins=[{"name": "pii_redact"}], steps=STEPS)
    triage = for_call(REGISTRY, assembly, ("triage",))
    answer = for_call(REGISTRY, assembly, ("answer",))
    assert [p.name for p in triage] == ["pii_redact"]
    assert [p.name for p in answer] == ["pii_redact", "output_limits"]
    assert for_call(REGISTRY, assembly, ("answer",)) is answer  # built once per (Assembly, steps)
    assert for_call(REGISTRY, compiled(), ()) == ()


def test_a_replica_without_a_named_plugin_refuses_that_assembly_and_serves_the_others() -> None:
    lacking = REGISTRY.without("output_limits")
    guarded = compiled(plugins=[{"name": "pii_redact"}], steps=STEPS)
    with pytest.raises(ServiceUnavailable) as caught:
        for_call(lacking, guarded, ("triage",))  # the step without it too: the Assembly named it
    assert (caught.value.status, caught.value.code) == (503, "plugin_unavailable")
    assert "output_limits" in caught.value.message
    assert [p.name for p in for_call(lacking, compiled(plugins=[{"name": "pii_redact"}]), ())] == ["pii_redact"]


def test_another_version_of_a_plugin_is_unavailable_too() -> None:
    assembly = compiled(plugins=[{"name": "pii_redact"}])
    frozen = assembly.plugins[0]
    moved = Assembly.model_validate({**assembly.model_dump(by_alias=True), "plugins": [{**frozen.model_dump(), "version": "0.9.0"}]})
    with pytest.raises(ServiceUnavailable, match="froze 0.9.0"):
        for_call(REGISTRY, moved, ())


def test_a_run_collects_counts_and_times_every_hook() -> None:
    seen: list[tuple[str, str]] = []
    assembly = compiled(plugins=[{"name": "pii_redact", "options": {"answers": True}}, {"name": "output_limits"}])
    run = Run(for_call(REGISTRY, assembly, ()), lambda plugin, hook, s: seen.append((plugin, hook)))
    body = run.request({"messages": [{"role": "user", "content": "mail me: bob@example.com"}]})
    assert body["messages"][0]["content"] == "mail me: [email]"
    assert run.response({"choices": [{"message": {"content": "ok"}}]}) is None
    assert run.counts() == {"pii_redact": {"prompt_email": 1}}
    assert ("pii_redact", "on_request") in seen and ("output_limits", "on_response") in seen


def test_the_readme_plan_that_selects_plugins_compiles() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Policy plugins"):]
    plan_yaml = section[section.index("```yaml") + 7:section.index("```", section.index("```yaml") + 7)]
    assembly = compile_plan(parse_plan_yaml(plan_yaml), SETTINGS, registry=REGISTRY).assembly
    assert [p.name for p in assembly.plugins] == ["prompt_guard", "pii_redact"]
    assert [p.name for p in assembly.steps[1].plugins] == ["output_limits"]
    assert assembly.plugins[0].options["deny_patterns"] == [r"rm\s+-rf", r"drop\s+table"]
