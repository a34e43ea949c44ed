"""The frozen Assembly: what a session may do, compiled once and never reinterpreted.

Its canonical JSON (sorted keys, no whitespace, `schema` version) is what gets hashed
into the `asm_` id and stored. Read back tolerantly (extra="ignore") so journals made
under an older schema stay replayable. All names are normalised: trimmed, lower-case.
Money is integer nano-dollars; prices are nano-dollars per million tokens.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FrozenPrice(_Frozen):
    input_nanos_per_mtok: int
    output_nanos_per_mtok: int
    source: str  # "settings" or "litellm:<version>"


class Deployment(_Frozen):
    provider: str
    upstream_model: str
    weight: int = 1
    # Its own frozen price, when the settings declare one; None: the model's.
    price: FrozenPrice | None = None

    @model_serializer(mode="wrap")
    def _without_shared_price(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null: Assemblies compiled before deployments had prices keep their ids.
        data: dict[str, Any] = handler(self)
        if data.get("price") is None:
            data.pop("price", None)
        return data

    @property
    def label(self) -> str:
        """How the journal names it: "provider:upstream_model"."""
        return f"{self.provider}:{self.upstream_model}"


class ModelGrant(_Frozen):
    name: str  # what clients send as "model" (normalised)
    provider: str
    provider_kind: str  # "openai" | "litellm" | "mock"
    upstream_model: str  # pinned
    kind: str = "chat"  # "chat" | "completion" | "embedding"
    max_tokens: int  # cap; absent in a request -> set to this
    params: dict[str, Any] = Field(default_factory=dict)  # pinned; may not be overridden
    max_n: int = 1
    allow_logprobs: bool = False
    allow_logit_bias: bool = False
    encoding: str | None = None  # tiktoken encoding for estimates; None: conservative bound
    price: FrozenPrice
    # Models of the same Assembly tried in order when this one's upstream fails first.
    fallbacks: tuple[str, ...] = ()
    # Upstreams sharing this model and its price, the first being `provider`/`upstream_model`;
    # empty: that one alone. `balance` is "weighted" or "least_in_flight".
    deployments: tuple[Deployment, ...] = ()
    balance: str = "weighted"

    @property
    def prices(self) -> tuple[FrozenPrice, ...]:
        """Every price a call to this model may be charged: its own, and its deployments' own."""
        return (self.price, *(d.price for d in self.deployments if d.price is not None))

    def price_at(self, deployment: Deployment | None) -> FrozenPrice:
        """The frozen price of a call `deployment` served (None: the model's own upstream)."""
        return deployment.price if deployment is not None and deployment.price is not None else self.price

    def deployment(self, label: str) -> Deployment | None:
        return next((d for d in self.deployments if d.label == label), None)

    @model_serializer(mode="wrap")
    def _without_unset_routing(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than empty: Assemblies compiled before these existed keep their ids.
        data: dict[str, Any] = handler(self)
        for key, unset in (("fallbacks", []), ("deployments", []), ("balance", "weighted")):
            if data.get(key) in (unset, ()):
                data.pop(key, None)
        return data


class ToolGrant(_Frozen):
    name: str  # function name (normalised)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)  # normalised JSON schema


class McpTool(_Frozen):
    """One MCP tool as the server defined it at compile time, frozen with its hash."""

    server: str
    name: str  # the server's own name for it, case kept: what the upstream is called with
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=dict)
    output_schema: dict[str, Any] | None = None
    annotations: dict[str, Any] | None = None
    definition_hash: str  # sha256 of the canonical definition; see gateway.mcp.definitions
    price_nanos: int  # per call, whatever its outcome
    entry: int  # index of the plan's mcp entry: max_calls counts per entry
    max_calls: int | None = None


class PluginGrant(_Frozen):
    """A policy plugin as the plan selected it: registry name, version and validated options."""

    name: str
    version: str
    options: dict[str, Any] = Field(default_factory=dict)


class Step(_Frozen):
    id: str
    model: str | None = None  # None: the step admits only its (MCP) tools
    tools: tuple[str, ...] = ()
    next: tuple[str, ...] = ()
    worst_case_nanos: int = 0
    plugins: tuple[PluginGrant, ...] = ()  # run after the plan-level ones on this step's calls


class Budget(_Frozen):
    usd_nanos: int | None = None
    tokens: int | None = None
    requests: int | None = None


class Limits(_Frozen):
    session_rpm: int | None = None
    session_tpm: int | None = None
    tenant_rpm: int | None = None
    tenant_tpm: int | None = None
    tenant_usd_nanos_per_day: int | None = None


class Vcs(_Frozen):
    """The capability whitelist derived from the plan: zero trust, what is absent is denied."""

    models: tuple[str, ...]
    tools: tuple[str, ...]
    builtin_tools: tuple[str, ...] = ()  # non-function tool types, e.g. "web_search"
    mcp_tools: tuple[str, ...] = ()  # "<server>__<tool>", exact


class Assembly(_Frozen):
    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema")
    name: str
    tenant: str | None = None
    models: dict[str, ModelGrant]
    tools: dict[str, ToolGrant] = Field(default_factory=dict)
    mcp: dict[str, McpTool] = Field(default_factory=dict)  # by "<server>__<tool>"
    vcs: Vcs
    budget: Budget = Budget()
    limits: Limits = Limits()
    ttl_s: int = 3600
    # Empty: any order within the VCS. Otherwise steps[0] is the entry step.
    steps: tuple[Step, ...] = ()
    # Largest prompt (tokens) a request may carry, used for worst-case estimates.
    max_prompt_tokens: int = 0
    # Policy plugins run on every call, in this order (see gateway/plugins.py).
    plugins: tuple[PluginGrant, ...] = ()

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    def canonical_json(self) -> bytes:
        data = self.model_dump(mode="json", by_alias=True)
        # Fields added after schema 1 are left out while empty, so the plans that
        # existed before them keep their Assembly ids.
        if not data["mcp"]:
            del data["mcp"]
            del data["vcs"]["mcp_tools"]
        # Absent, not empty: an Assembly without plugins keeps the id it had before they existed.
        _drop_empty_plugins(data)
        for step in data["steps"]:
            _drop_empty_plugins(step)
        return canonical_json(data)

    @functools.cached_property
    def id(self) -> str:
        # Immutable, so hash once: the id is read on every request's journal entries.
        return assembly_id(self.canonical_json())

    @functools.cached_property
    def predecessors(self) -> dict[str, tuple[str, ...]]:
        """For each step, the steps it may follow ("^" is the start), derived once."""
        preds: dict[str, list[str]] = {s.id: [] for s in self.steps}
        if self.steps:
            preds[self.steps[0].id].append("^")
        for s in self.steps:
            for nxt in s.next:
                preds.setdefault(nxt, []).append(s.id)
        return {sid: tuple(p) for sid, p in preds.items()}

    def chain(self, model: ModelGrant) -> tuple[ModelGrant, ...]:
        """The model and its frozen fallbacks, in the order they are tried."""
        return (model, *(self.models[name] for name in model.fallbacks))

    def step(self, step_id: str) -> Step | None:
        for s in self.steps:
            if s.id == step_id:
                return s
        return None


def _drop_empty_plugins(data: dict[str, Any]) -> None:
    if not data.get("plugins"):
        data.pop("plugins", None)


def canonical_json(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


def assembly_id(canonical: bytes) -> str:
    return "asm_" + hashlib.sha256(canonical).hexdigest()[:32]
