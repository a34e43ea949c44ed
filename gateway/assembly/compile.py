"""The plan compiler: validate a Plan against the Settings and freeze it into an Assembly.

Everything a request will later need is resolved here, once: provider, pinned upstream
model, frozen price, normalised tool schemas, the step graph and the VCS.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gateway.assembly.mcp_tools import SEPARATOR, Listing, grant_mcp_tools, qualified
from gateway.assembly.model import (
    Assembly,
    Budget,
    Deployment,
    Limits,
    McpTool,
    ModelGrant,
    PluginGrant,
    Step,
    ToolGrant,
    Vcs,
)
from gateway.assembly.plan import (
    Plan,
    PlanInvalid,
    PlanModel,
    PlanPlugin,
    PlanStep,
    PlanTool,
    Problem,
)
from gateway.assembly.prices import MAX_NANOS_PER_MTOK, freeze_price, price_from_usd_per_mtok
from gateway.money import cost_nanos, nanos_to_usd_str, usd_to_nanos
from gateway.settings import ModelSettings, Settings
from gateway.tokenizer import encoding_name_for

if TYPE_CHECKING:
    from gateway.plugins import Registry

__all__ = ["Compiled", "compile_plan", "tokens_per_call", "worst_case_nanos"]

# Request fields a plan may not pin: each request sets them, or a dedicated plan field caps them.
_UNPINNABLE = {
    "model": "is chosen by each request",
    "messages": "is part of each request",
    "prompt": "is part of each request",
    "input": "is part of each request",
    "stream": "is chosen by each request",
    "stream_options": "is chosen by each request",
    "tools": "is declared under tools",
    "functions": "is declared under tools",
    "max_tokens": "is capped by max_tokens",
    "max_completion_tokens": "is capped by max_tokens",
    "n": "is capped by max_n",
    "logprobs": "is governed by allow_logprobs",
    "top_logprobs": "is governed by allow_logprobs",
    "logit_bias": "is governed by allow_logit_bias",
}
_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
# Beyond 2**53 floats stop being exact integers, and orjson refuses ints past 64 bits.
_EXACT_FLOAT_INT = 2**53
_INT64 = 2**63


@dataclass(frozen=True)
class Compiled:
    assembly: Assembly
    warnings: list[str] = field(default_factory=list)

    @property
    def assembly_id(self) -> str:
        return self.assembly.id


@dataclass
class _Report:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))


def tokens_per_call(grant: ModelGrant, prompt_tokens: int) -> int:
    return prompt_tokens + grant.max_tokens * grant.max_n


def worst_case_nanos(grant: ModelGrant, prompt_tokens: int) -> int:
    """The most one call can cost: a full prompt and every choice at max_tokens, rounded up,
    at the dearest price it may be charged (a deployment's own included)."""
    return max(
        cost_nanos(prompt_tokens, price.input_nanos_per_mtok)
        + cost_nanos(grant.max_tokens * grant.max_n, price.output_nanos_per_mtok)
        for price in grant.prices
    )


def _chain_worst_case(grant: ModelGrant, models: dict[str, ModelGrant], prompt_tokens: int) -> int:
    """A call may be served by any model of its fallback chain: the dearest bounds it."""
    chain = [grant, *(models[name] for name in grant.fallbacks if name in models)]
    return max(worst_case_nanos(g, prompt_tokens) for g in chain)


def compile_plan(
    plan: Plan, settings: Settings, *, mcp_listings: Mapping[str, Listing] | None = None,
    registry: Registry | None = None,
) -> Compiled:
    """Freeze `plan` into an Assembly, or raise PlanInvalid listing every problem.

    `mcp_listings`: what each tool server the plan names answered to tools/list
    (`gateway.mcp.upstream.discover`); compiling stays free of I/O.
    `registry` names the plugins a plan may select; absent, this process's entry points.
    """
    report = _Report()
    models = _grant_models(plan.models, settings, report)
    tools = _grant_tools(plan.tools, report)
    builtin = _builtin_tools(plan, report)
    servers = {server.name for server in settings.tool_servers}
    mcp = grant_mcp_tools(plan, mcp_listings or {}, servers, report.problems, report.warnings)
    if registry is None and (plan.plugins or any(s.plugins for s in plan.steps)):
        from gateway.plugins import Registry  # the plugins import the Assembly model

        registry = Registry.from_entry_points()
    plugins = _grant_plugins(plan.plugins, "plugins", registry, report)
    steps = _compile_steps(plan, models, mcp, registry, report)
    if report.problems:
        raise PlanInvalid(report.problems, source=f"plan {plan.name!r}")
    budget = Budget(
        usd_nanos=None if plan.budget.usd is None else usd_to_nanos(plan.budget.usd),
        tokens=plan.budget.tokens,
        requests=plan.budget.requests,
    )
    _check_budget(plan, budget, models, steps, report)
    assembly = Assembly(
        name=plan.name,
        tenant=plan.tenant,
        models=models,
        tools=tools,
        mcp=mcp,
        vcs=Vcs(
            models=tuple(sorted(models)), tools=tuple(sorted(tools)), builtin_tools=builtin, mcp_tools=tuple(sorted(mcp))
        ),
        budget=budget,
        limits=_limits(plan),
        ttl_s=plan.ttl_s,
        steps=steps,
        max_prompt_tokens=plan.max_prompt_tokens,
        plugins=plugins,
    )
    return Compiled(assembly=assembly, warnings=report.warnings)


def _grant_plugins(
    wanted: Iterable[PlanPlugin], path: str, registry: Registry | None, report: _Report
) -> tuple[PluginGrant, ...]:
    """Each selected plugin with its options validated by its own model, and its version."""
    grants: list[PluginGrant] = []
    seen: set[str] = set()
    for i, plugin in enumerate(wanted):
        where = f"{path}.{i}"
        if plugin.name in seen:
            report.problem(f"{where}.name", f"plugin {plugin.name!r} is listed twice")
            continue
        seen.add(plugin.name)
        if registry is None or registry.get(plugin.name) is None:
            known = ", ".join(registry.names()) if registry is not None else ""
            report.problem(
                f"{where}.name", f"unknown plugin {plugin.name!r}; registered: {known or 'none'}"
            )
            continue
        options = _json_value(plugin.options, f"{where}.options", report)
        try:
            grants.append(registry.freeze(plugin.name, options))
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                message = err["msg"].removeprefix("Value error, ")
                report.problem(f"{where}.options" + (f".{loc}" if loc else ""), message)
    return tuple(grants)


def _grant_models(
    plan_models: Iterable[PlanModel], settings: Settings, report: _Report
) -> dict[str, ModelGrant]:
    grants: dict[str, ModelGrant] = {}
    seen: set[str] = set()
    for i, wanted in enumerate(plan_models):
        path = f"models.{i}"
        if wanted.name in seen:
            report.problem(f"{path}.name", f"duplicate model {wanted.name!r}")
            continue
        seen.add(wanted.name)
        grant = _grant_model(wanted, path, settings, report)
        if grant is not None:
            grants[grant.name] = grant
    _check_fallbacks(plan_models, grants, report)
    return grants


def _deployments(known: ModelSettings, path: str, report: _Report) -> tuple[Deployment, ...]:
    """The model's upstreams, the first its own; a deployment's own price is frozen with it."""
    if not known.deployments:
        return ()
    first = Deployment(provider=known.provider, upstream_model=known.target, weight=known.weight)
    out = [first]
    for j, d in enumerate(known.deployments):
        price = None if d.price is None else price_from_usd_per_mtok(d.price.input_per_mtok, d.price.output_per_mtok)
        if price is not None and max(price.input_nanos_per_mtok, price.output_nanos_per_mtok) > MAX_NANOS_PER_MTOK:
            report.problem(f"{path}.deployments.{j}", f"price of {known.name!r} on {d.provider!r} is above $1M per million tokens")
        out.append(Deployment(provider=d.provider, upstream_model=d.upstream_model or known.target, weight=d.weight, price=price))
    return tuple(out)


def _check_fallbacks(plan_models: Iterable[PlanModel], grants: dict[str, ModelGrant], report: _Report) -> None:
    """A fallback is another model of this plan, of the same kind, named once."""
    for i, wanted in enumerate(plan_models):
        grant = grants.get(wanted.name)
        for j, name in enumerate(wanted.fallbacks):
            path = f"models.{i}.fallbacks.{j}"
            other = grants.get(name)
            if name == wanted.name or name in wanted.fallbacks[:j]:
                report.problem(path, f"{name!r} is the model itself or already in its fallbacks")
            elif other is None:
                report.problem(path, f"fallback {name!r} is not a model of this plan")
            elif grant is not None and other.kind != grant.kind:
                report.problem(path, f"fallback {name!r} is a {other.kind} model, {wanted.name!r} a {grant.kind} model")


def _grant_model(
    wanted: PlanModel, path: str, settings: Settings, report: _Report
) -> ModelGrant | None:
    known = settings.model(wanted.name)
    if known is None:
        report.problem(
            f"{path}.name", f"unknown model {wanted.name!r}: not in the gateway settings"
        )
        return None
    before = len(report.problems)
    max_tokens = wanted.max_tokens
    if known.kind == "embedding":
        if max_tokens is not None:
            report.warnings.append(
                f"{path}.max_tokens: ignored, embedding models produce no tokens"
            )
        max_tokens = 0
    elif max_tokens is None:
        report.problem(f"{path}.max_tokens", f"required for {known.kind} models")
    price = freeze_price(known)
    if price is None:
        report.problem(path, f"no price for {wanted.name!r}: set its price in the gateway settings")
    elif max(price.input_nanos_per_mtok, price.output_nanos_per_mtok) > MAX_NANOS_PER_MTOK:
        report.problem(path, f"price of {wanted.name!r} is above $1M per million tokens")
    params = _pinned_params(wanted.params, f"{path}.params", report)
    deployments = _deployments(known, path, report)
    if len(report.problems) > before or price is None or max_tokens is None:
        return None
    return ModelGrant(
        name=wanted.name,
        provider=known.provider,
        provider_kind=settings.provider(known.provider).kind,
        upstream_model=known.target,
        kind=known.kind,
        max_tokens=max_tokens,
        params=params,
        max_n=wanted.max_n,
        allow_logprobs=wanted.allow_logprobs,
        allow_logit_bias=wanted.allow_logit_bias,
        fallbacks=tuple(wanted.fallbacks),
        deployments=deployments,
        balance=known.balance,
        encoding=known.encoding
        or encoding_name_for(known.target)
        or encoding_name_for(wanted.name),
        price=price,
    )


def _pinned_params(params: dict[str, Any], path: str, report: _Report) -> dict[str, Any]:
    for key in sorted(params):
        if key in _UNPINNABLE:
            report.problem(f"{path}.{key}", f"cannot be pinned: it {_UNPINNABLE[key]}")
    value = _json_value(params, path, report)
    return value if isinstance(value, dict) else {}


def _json_value(value: Any, path: str, report: _Report) -> Any:
    """`value` as plain JSON, with integral floats as ints so 0 and 0.0 hash the same."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            report.problem(path, "integer out of the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            report.problem(path, "must be a finite number")
        elif value.is_integer() and abs(value) < _EXACT_FLOAT_INT:
            return int(value)
        return value
    if isinstance(value, list | tuple):
        return [_json_value(item, f"{path}.{i}", report) for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                report.problem(f"{path}.{key}", "keys must be strings")
                continue
            out[key] = _json_value(item, f"{path}.{key}", report)
        return out
    report.problem(path, f"not a JSON value ({type(value).__name__})")
    return None


def _grant_tools(plan_tools: Iterable[PlanTool], report: _Report) -> dict[str, ToolGrant]:
    grants: dict[str, ToolGrant] = {}
    for i, tool in enumerate(plan_tools):
        path = f"tools.{i}"
        if tool.name in grants:
            report.problem(f"{path}.name", f"duplicate tool {tool.name!r}")
            continue
        schema = _tool_schema(tool.parameters, f"{path}.parameters", report)
        grants[tool.name] = ToolGrant(
            name=tool.name, description=tool.description, parameters=schema
        )
    return grants


def _tool_schema(parameters: dict[str, Any] | None, path: str, report: _Report) -> dict[str, Any]:
    if parameters is None:
        return dict(_EMPTY_SCHEMA)
    schema: dict[str, Any] = _json_value(parameters, path, report)
    if schema.get("type") != "object":
        report.problem(f"{path}.type", 'must be "object": function arguments are a JSON object')
    properties = schema.setdefault("properties", {})
    if not isinstance(properties, dict):
        report.problem(f"{path}.properties", "must be a mapping of argument name to schema")
        properties = {}
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        report.problem(f"{path}.required", "must be a list of argument names")
    else:
        for name in required:
            if name not in properties:
                report.warnings.append(f"{path}.required: {name!r} is not among the properties")
    return schema


def _builtin_tools(plan: Plan, report: _Report) -> tuple[str, ...]:
    functions = {tool.name for tool in plan.tools}
    seen: list[str] = []
    for i, name in enumerate(plan.builtin_tools):
        path = f"builtin_tools.{i}"
        if name == "function":
            report.problem(path, "function tools are declared under tools")
        elif name in functions:
            report.problem(path, f"{name!r} is also declared as a function tool")
        elif name in seen:
            report.problem(path, f"duplicate builtin tool {name!r}")
        else:
            seen.append(name)
    return tuple(sorted(seen))


def _compile_steps(
    plan: Plan, models: dict[str, ModelGrant], mcp: dict[str, McpTool], registry: Registry | None,
    report: _Report,
) -> tuple[Step, ...]:
    ids: set[str] = set()
    for i, step in enumerate(plan.steps):
        if step.id in ids:
            report.problem(f"steps.{i}.id", f"duplicate step id {step.id!r}")
        ids.add(step.id)
    compiled = tuple(
        _compile_step(i, step, plan, ids, models, mcp, report).model_copy(
            update={"plugins": _grant_plugins(step.plugins, f"steps.{i}.plugins", registry, report)}
        )
        for i, step in enumerate(plan.steps)
    )
    _check_reachable(plan.steps, report)
    if plan.steps:
        _warn_unused(plan, report)
    return compiled


def _compile_step(
    i: int,
    step: PlanStep,
    plan: Plan,
    ids: set[str],
    models: dict[str, ModelGrant],
    mcp: dict[str, McpTool],
    report: _Report,
) -> Step:
    path = f"steps.{i}"
    if step.model is not None and step.model not in {m.name for m in plan.models}:
        report.problem(f"{path}.model", f"model {step.model!r} is not declared under models")
    tools = _step_tools(step, path, plan, mcp, report)
    _check_refs(step.next, f"{path}.next", ids, "step", "steps", report)
    grant = models.get(step.model) if step.model is not None else None
    worst = 0 if grant is None else _chain_worst_case(grant, models, plan.max_prompt_tokens)
    if step.model is None:
        # A step without a model is one tool call: the dearest of its tools.
        worst = max((mcp[t].price_nanos for t in tools if t in mcp), default=0)
    return Step(
        id=step.id,
        model=step.model,
        tools=tuple(sorted(set(tools))),
        next=tuple(sorted(set(step.next))),
        worst_case_nanos=worst,
    )


def _step_tools(step: PlanStep, path: str, plan: Plan, mcp: dict[str, McpTool], report: _Report) -> list[str]:
    """The step's tools, each resolved: an MCP tool exactly as named (never normalised),
    any other lower-cased. An MCP tool whose server failed is reported under mcp only."""
    declared = {t.name for t in plan.tools} | set(plan.builtin_tools)
    declared_mcp = {qualified(e.server, t) for e in plan.mcp for t in e.tools}
    servers = {e.server for e in plan.mcp}
    resolved: list[str] = []
    named_mcp = False
    for j, name in enumerate(step.tools):
        is_mcp = name in declared_mcp or name.split(SEPARATOR, 1)[0] in servers
        named_mcp = named_mcp or is_mcp
        ref = name if is_mcp else name.lower()
        if ref in resolved:
            report.problem(f"{path}.tools.{j}", f"tool {name!r} is listed twice")
            continue
        resolved.append(ref)
        if is_mcp:
            if ref not in declared_mcp:
                report.problem(f"{path}.tools.{j}", f"unknown MCP tool {name!r}: not granted under mcp")
        elif ref not in declared:
            where = "tools, builtin_tools or mcp" if plan.mcp else "tools or builtin_tools"
            report.problem(f"{path}.tools.{j}", f"unknown tool {name!r}: not declared under {where}")
        elif step.model is None:
            report.problem(f"{path}.tools.{j}", f"{name!r} is not an MCP tool: a step without a model admits only MCP tools")
    if step.model is None and not named_mcp:
        report.problem(f"{path}.model", "required unless the step lists MCP tools")
    return [ref for ref in resolved if ref in mcp or ref not in declared_mcp]


def _check_refs(
    names: tuple[str, ...], path: str, known: set[str], what: str, where: str, report: _Report
) -> None:
    for j, name in enumerate(names):
        if name in names[:j]:
            report.problem(f"{path}.{j}", f"{what} {name!r} is listed twice")
        elif name not in known:
            report.problem(f"{path}.{j}", f"unknown {what} {name!r}: not declared under {where}")


def _check_reachable(steps: tuple[PlanStep, ...], report: _Report) -> None:
    if not steps:
        return
    following: dict[str, set[str]] = {}
    for step in steps:
        following.setdefault(step.id, set()).update(step.next)
    reached = {steps[0].id}
    frontier = [steps[0].id]
    while frontier:
        for nxt in following.get(frontier.pop(), ()):
            if nxt in following and nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    for i, step in enumerate(steps):
        if step.id not in reached:
            report.problem(f"steps.{i}", f"step {step.id!r} is unreachable from {steps[0].id!r}")


def _warn_unused(plan: Plan, report: _Report) -> None:
    used_models = {s.model for s in plan.steps if s.model is not None}
    used_tools = {t for s in plan.steps for t in s.tools}
    for i, model in enumerate(plan.models):
        if model.name not in used_models:
            report.warnings.append(f"models.{i}: {model.name!r} is used by no step")
    for i, tool in enumerate(plan.tools):
        if tool.name not in used_tools:
            report.warnings.append(f"tools.{i}: {tool.name!r} is used by no step")
    for i, name in enumerate(plan.builtin_tools):
        if name not in used_tools:
            report.warnings.append(f"builtin_tools.{i}: {name!r} is used by no step")
    for i, entry in enumerate(plan.mcp):
        for j, bare in enumerate(entry.tools):
            if qualified(entry.server, bare) not in used_tools:
                report.warnings.append(f"mcp.{i}.tools.{j}: {qualified(entry.server, bare)!r} is used by no step")


def _check_budget(
    plan: Plan,
    budget: Budget,
    models: dict[str, ModelGrant],
    steps: tuple[Step, ...],
    report: _Report,
) -> None:
    # With steps, each step is one possible call; without, any model may be called.
    calls = [(f"step {s.id!r}", models[s.model]) for s in steps if s.model is not None] or [
        (f"model {name!r}", models[name]) for name in sorted(models)
    ]
    if budget.usd_nanos is None:
        report.warnings.append("budget.usd: absent, spend is bounded only by tenant limits")
    for label, grant in calls:
        worst = _chain_worst_case(grant, models, plan.max_prompt_tokens)
        if budget.usd_nanos is not None and worst > budget.usd_nanos:
            report.warnings.append(
                f"budget.usd: {nanos_to_usd_str(budget.usd_nanos)} cannot cover one worst-case call"
                f" of {label} ({nanos_to_usd_str(worst)} USD)"
            )
        tokens = tokens_per_call(grant, plan.max_prompt_tokens)
        if budget.tokens is not None and tokens > budget.tokens:
            report.warnings.append(
                f"budget.tokens: {budget.tokens} cannot cover one worst-case call of {label}"
                f" ({tokens} tokens)"
            )
    if budget.requests == 0:
        report.warnings.append("budget.requests: 0 allows no request at all")


def _limits(plan: Plan) -> Limits:
    if plan.limits is None:
        return Limits()
    per_day = plan.limits.tenant_usd_per_day
    return Limits(
        session_rpm=plan.limits.session_rpm,
        session_tpm=plan.limits.session_tpm,
        tenant_rpm=plan.limits.tenant_rpm,
        tenant_tpm=plan.limits.tenant_tpm,
        tenant_usd_nanos_per_day=None if per_day is None else usd_to_nanos(per_day),
    )
