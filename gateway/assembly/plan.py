"""The Plan: an admin's declarative intent, as written (YAML or JSON), before compilation.

Parsing rejects unknown fields and trims and lower-cases every name, so the compiler
only sees normalised names. Every problem is reported at once, each with its path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from gateway.errors import ConfigError

__all__ = [
    "Plan",
    "PlanBudget",
    "PlanInvalid",
    "PlanLimits",
    "PlanMcp",
    "PlanModel",
    "PlanPlugin",
    "PlanStep",
    "PlanTool",
    "Problem",
    "load_plan_file",
    "parse_plan",
    "parse_plan_yaml",
]

# Bounds keep every derived amount (tokens x price, in nanos) inside a signed 64-bit integer,
# which is what orjson, Redis and the Lua scripts can represent exactly.
MAX_TOKENS = 10_000_000
MAX_COUNT = 10**15
MAX_USD = Decimal(10**9)


@dataclass(frozen=True)
class Problem:
    path: str  # dotted, e.g. "models.0.max_tokens"; "" is the plan itself
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}

    def __str__(self) -> str:
        return f"{self.path or '(plan)'}: {self.message}"


class PlanInvalid(ConfigError):
    """A plan that cannot be compiled; `problems` lists every reason, not just the first."""

    def __init__(self, problems: list[Problem], *, source: str = "plan") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: invalid plan: " + "; ".join(str(p) for p in problems))


def _normalise(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _trim(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _matching(pattern: str, rule: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {rule}")
        return value

    return AfterValidator(check)


ModelName = Annotated[
    str,
    BeforeValidator(_normalise),
    _matching(r"[^\s]{1,256}", "1-256 characters without whitespace"),
]
# OpenAI's rule for function names, lower-cased.
ToolName = Annotated[
    str,
    BeforeValidator(_normalise),
    _matching(r"[a-z0-9_-]{1,64}", "1-64 characters of a-z, 0-9, '_' or '-'"),
]
# MCP tool names are case-sensitive and never normalised; "<server>__<tool>" in steps.
McpToolName = Annotated[
    str, BeforeValidator(_trim), _matching(r"[A-Za-z0-9_.-]{1,128}", "1-128 characters of A-Z, a-z, 0-9, '_', '.' or '-'")
]
ServerName = Annotated[str, BeforeValidator(_normalise), _matching(r"[a-z0-9][a-z0-9_-]{0,63}", "a tool server's name")]


def _step_tool(value: Any) -> Any:
    """A step's tool: an MCP tool ("<server>__<tool>", case kept) or a function/builtin tool (lower-cased)."""
    if not isinstance(value, str):
        return value
    value = value.strip()
    return value if "__" in value.strip("_") else value.lower()


StepTool = Annotated[
    str, BeforeValidator(_step_tool), _matching(r"[A-Za-z0-9_.-]{1,200}", "a tool name, or <server>__<tool> for an MCP tool")
]
StepId = Annotated[
    str,
    BeforeValidator(_normalise),
    _matching(r"[a-z0-9_.-]{1,64}", "1-64 characters of a-z, 0-9, '_', '.' or '-'"),
]
PlanName = Annotated[
    str, BeforeValidator(_trim), _matching(r"[^\x00-\x1f]{1,128}", "1-128 printable characters")
]
# Tenants end up inside Redis hash tags ("{ten:X}"), so braces and spaces are out.
Tenant = Annotated[
    str,
    BeforeValidator(_trim),
    _matching(r"[A-Za-z0-9_.:-]{1,128}", "1-128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-'"),
]
Tokens = Annotated[int, Field(gt=0, le=MAX_TOKENS)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
PerMinute = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Usd = Annotated[Decimal, Field(ge=0, le=MAX_USD, allow_inf_nan=False)]


def _non_empty(models: tuple[PlanModel, ...]) -> tuple[PlanModel, ...]:
    # Not Field(min_length=1): pydantic would also report it when an item merely failed.
    if not models:
        raise ValueError("at least one model is required")
    return models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlanModel(_Strict):
    name: ModelName
    # Required for chat and completion models; embedding models produce no output tokens.
    max_tokens: Tokens | None = None
    params: dict[str, Any] = Field(default_factory=dict)  # pinned; a request may not override
    max_n: Annotated[int, Field(ge=1, le=128)] = 1
    allow_logprobs: bool = False
    allow_logit_bias: bool = False
    # Models of this plan to try, in order, when this one's upstream fails before answering.
    fallbacks: list[ModelName] = Field(default_factory=list)


class PlanTool(_Strict):
    name: ToolName
    description: str = ""
    parameters: dict[str, Any] | None = None  # JSON schema; absent: no arguments


class PlanMcp(_Strict):
    """Tools granted from one MCP server of the gateway's settings, at a price per call."""

    server: ServerName
    tools: Annotated[tuple[McpToolName, ...], Field(min_length=1)]
    price_per_call_usd: Usd
    max_calls: Count | None = None  # per session, over all the tools of this entry


class PlanBudget(_Strict):
    usd: Usd | None = None
    tokens: Count | None = None
    requests: Count | None = None


class PlanLimits(_Strict):
    session_rpm: PerMinute | None = None
    session_tpm: PerMinute | None = None
    tenant_rpm: PerMinute | None = None
    tenant_tpm: PerMinute | None = None
    tenant_usd_per_day: Usd | None = None


# Registry names (entry points in `abc_gateway.plugins`), never import paths.
PluginName = Annotated[
    str,
    BeforeValidator(_normalise),
    _matching(r"[a-z][a-z0-9_]{0,63}", "1-64 characters of a-z, 0-9 or '_', starting with a letter"),
]


class PlanPlugin(_Strict):
    name: PluginName
    options: dict[str, Any] = Field(default_factory=dict)  # validated by the plugin's own model


class PlanStep(_Strict):
    id: StepId
    model: ModelName | None = None  # absent: the step admits no model call, only its tools
    tools: tuple[StepTool, ...] = ()  # function, builtin or MCP tools
    next: tuple[StepId, ...] = ()
    plugins: tuple[PlanPlugin, ...] = ()  # run after the plan's own on this step's calls


class Plan(_Strict):
    name: PlanName
    tenant: Tenant | None = None
    models: Annotated[tuple[PlanModel, ...], AfterValidator(_non_empty)]
    tools: tuple[PlanTool, ...] = ()
    builtin_tools: tuple[ToolName, ...] = ()  # non-function tool types, e.g. "web_search"
    mcp: tuple[PlanMcp, ...] = ()
    budget: PlanBudget = PlanBudget()
    limits: PlanLimits | None = None
    ttl_s: Annotated[int, Field(gt=0, le=366 * 24 * 3600)] = 3600
    # Prompt allowance (tokens) used for worst-case estimates.
    max_prompt_tokens: Tokens = 8192
    # Optional; absent: any order within the VCS. steps[0] is the entry step.
    steps: tuple[PlanStep, ...] = ()
    # Policy plugins on every call, in this order; each step may add its own.
    plugins: tuple[PlanPlugin, ...] = ()


def _problems_of(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        problems.append(Problem(path, message))
    return problems


def parse_plan(data: Any, *, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise PlanInvalid([Problem("", "a plan must be a mapping")], source=source)
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanInvalid(_problems_of(exc), source=source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of duplicate keys; in a plan a duplicate is always a mistake."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_plan_yaml(text: str, *, source: str = "plan") -> Plan:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise PlanInvalid([Problem("", f"not valid YAML: {exc}")], source=source) from None
    return parse_plan(data, source=source)


def load_plan_file(path: str | os.PathLike[str]) -> Plan:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanInvalid([Problem("", f"cannot read: {exc.strerror}")], source=source) from None
    return parse_plan_yaml(text, source=source)
