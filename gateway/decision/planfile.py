"""A plan as plain data (what a person edits) and as YAML.

The compiler's view of each compiled plan is stored with its version; for an Assembly
compiled before versions were kept, the plan is rebuilt from the Assembly itself, which
compiles back to the same Assembly while the settings' prices are unchanged.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import yaml

from gateway.assembly.model import Assembly, ModelGrant, Step, ToolGrant
from gateway.assembly.plan import Plan
from gateway.money import NANOS_PER_USD

__all__ = ["plan_data", "plan_from_assembly", "plan_yaml", "usd_of_nanos"]


def plan_data(plan: Plan) -> dict[str, Any]:
    """The plan as the compiler read it (names normalised), defaults left out."""
    data: dict[str, Any] = _plain(plan.model_dump(mode="python", exclude_defaults=True))
    return data


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, money as an int or float when exact, else a string."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return _number(value)
    return value


def _number(value: Decimal) -> int | float | str:
    if value == value.to_integral_value():
        return int(value)
    as_float = float(value)
    return as_float if Decimal(repr(as_float)) == value else str(value)


def usd_of_nanos(nanos: int) -> int | float | str:
    return _number(Decimal(nanos) / NANOS_PER_USD)


def plan_from_assembly(assembly: Assembly) -> dict[str, Any]:
    """A plan that compiles back to `assembly` (prices come from the settings again)."""
    plan: dict[str, Any] = {"name": assembly.name}
    if assembly.tenant is not None:
        plan["tenant"] = assembly.tenant
    plan["models"] = [_model(grant) for grant in assembly.models.values()]
    if assembly.tools:
        plan["tools"] = [_tool(grant) for grant in assembly.tools.values()]
    if assembly.vcs.builtin_tools:
        plan["builtin_tools"] = list(assembly.vcs.builtin_tools)
    budget = assembly.budget.model_dump(exclude_none=True)
    if "usd_nanos" in budget:
        budget["usd"] = usd_of_nanos(budget.pop("usd_nanos"))
    if budget:
        plan["budget"] = budget
    limits = assembly.limits.model_dump(exclude_none=True)
    if "tenant_usd_nanos_per_day" in limits:
        limits["tenant_usd_per_day"] = usd_of_nanos(limits.pop("tenant_usd_nanos_per_day"))
    if limits:
        plan["limits"] = limits
    plan["ttl_s"] = assembly.ttl_s
    plan["max_prompt_tokens"] = assembly.max_prompt_tokens
    if assembly.steps:
        plan["steps"] = [_step(step) for step in assembly.steps]
    return plan


def _model(grant: ModelGrant) -> dict[str, Any]:
    out: dict[str, Any] = {"name": grant.name}
    if grant.kind != "embedding":
        out["max_tokens"] = grant.max_tokens
    if grant.params:
        out["params"] = grant.params
    if grant.max_n != 1:
        out["max_n"] = grant.max_n
    if grant.allow_logprobs:
        out["allow_logprobs"] = True
    if grant.allow_logit_bias:
        out["allow_logit_bias"] = True
    return out


def _tool(grant: ToolGrant) -> dict[str, Any]:
    out: dict[str, Any] = {"name": grant.name}
    if grant.description:
        out["description"] = grant.description
    out["parameters"] = grant.parameters
    return out


def _step(step: Step) -> dict[str, Any]:
    return {"id": step.id, "model": step.model, "tools": list(step.tools), "next": list(step.next)}


def plan_yaml(plan: dict[str, Any], *, header: list[str] | None = None) -> str:
    """YAML in the plan's own key order, with `header` lines as comments on top."""
    text = yaml.safe_dump(plan, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header or [])
    return comments + text
