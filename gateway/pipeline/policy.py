"""The Policy Enforcement Point: a request checked against its session's Assembly (model,
tools, upstream overrides, parameters, steps), and an answer's tool calls against what
the request offered. Pure functions, no I/O; every denial names its rule in `extra`.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.assembly.model import Assembly, ModelGrant
from gateway.errors import NotFound, StateConflict
from gateway.pipeline.request_fields import (
    denied,
    invalid,
    normalise_name,
    offered_tools,
    reject_overrides,
    reject_unknown_fields,
    show,
)
from gateway.pipeline.request_schema import check_shape
from gateway.pipeline.usage import tool_call_names
from gateway.providers.base import Endpoint

__all__ = ["Grant", "authorize", "check_output", "tool_call_names"]

_MODEL_KIND: Final[dict[Endpoint, str]] = {
    Endpoint.CHAT: "chat",
    Endpoint.COMPLETIONS: "completion",
    Endpoint.EMBEDDINGS: "embedding",
}
_TOKEN_FIELDS: Final = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True, slots=True)
class Grant:
    """What one request may do, and the body that goes upstream."""

    model: ModelGrant
    body: dict[str, Any]  # a new dict: model pinned upstream, max_tokens filled, params pinned
    tools: frozenset[str]  # normalised function names the request offers or forces
    candidate_steps: tuple[str, ...]  # steps that fit, in assembly order; () without steps
    n: int  # choices generated (best_of included: those are billed too)
    max_output_tokens: int  # per choice; 0 for embeddings
    stream: bool


def authorize(
    assembly: Assembly,
    endpoint: Endpoint,
    body: dict[str, Any],
    *,
    known_models: Container[str],
) -> Grant:
    """Check one request, or raise the GatewayError that says why not. `body` is not mutated."""
    if not isinstance(body, dict):
        raise invalid("invalid_body", "the request body must be a JSON object")
    reject_overrides(body)  # before the allow-list, so an override is a 403, not a 400
    reject_unknown_fields(endpoint, body)
    check_shape(endpoint, body)
    model = _resolve_model(assembly, endpoint, body.get("model"), known_models)
    functions: frozenset[str] = frozenset()
    if endpoint is Endpoint.CHAT:
        functions, builtins = offered_tools(body)
        _check_tools(assembly, functions, builtins)
    # Shallow: messages can be large and are never rewritten here.
    upstream = dict(body)
    _pin_params(model, body, upstream)
    upstream["model"] = model.upstream_model
    if functions:
        _freeze_tool_definitions(assembly, upstream)
    # From here on the upstream body is checked: pinned values count like sent ones.
    max_output = _cap_tokens(model, endpoint, upstream)
    n = _check_sampling(model, endpoint, upstream)
    stream = _check_stream(upstream)
    return Grant(
        model=model,
        body=upstream,
        tools=functions,
        candidate_steps=_candidate_steps(assembly, model.name, functions),
        n=n,
        max_output_tokens=max_output,
        stream=stream,
    )


def _resolve_model(
    assembly: Assembly, endpoint: Endpoint, raw: object, known_models: Container[str]
) -> ModelGrant:
    if not isinstance(raw, str) or not raw.strip():
        raise invalid("invalid_model", "'model' must be a non-empty string", param="model")
    name = normalise_name(raw)
    grant = assembly.models.get(name)
    if grant is None or name not in assembly.vcs.models:
        if name in known_models:
            message = f"model '{show(name)}' is not in this session's VCS"
            raise denied("model_not_allowed", message, param="model")
        raise NotFound(
            f"The model '{show(name)}' does not exist",
            param="model",
            code="model_not_found",
            extra={"rule": "model_not_found"},
        )
    kind = _MODEL_KIND[endpoint]
    if grant.kind != kind:
        raise invalid(
            "model_endpoint_mismatch",
            f"model '{name}' is a {grant.kind} model and does not serve /v1/{endpoint}",
            param="model",
        )
    return grant


def _check_tools(assembly: Assembly, functions: frozenset[str], builtins: frozenset[str]) -> None:
    # Sorted, so the same request is always denied with the same message.
    for name in sorted(functions):
        if not _granted_function(assembly, name):
            message = f"tool '{show(name)}' is not in this session's VCS"
            raise denied("tool_not_allowed", message, param="tools")
    for kind in sorted(builtins):
        if kind not in assembly.vcs.builtin_tools:
            raise denied(
                "builtin_tool_not_allowed",
                f"built-in tool '{show(kind)}' is not in this session's VCS",
                param="tools",
            )


def _granted_function(assembly: Assembly, name: str) -> bool:
    """A function tool of the VCS, or an MCP tool (its lower-case name: function names are
    compared case-folded) that a model may be offered and the client then calls via /mcp."""
    if name in assembly.tools and name in assembly.vcs.tools:
        return True
    return name in assembly.mcp and name in assembly.vcs.mcp_tools


def _freeze_tool_definitions(assembly: Assembly, upstream: dict[str, Any]) -> None:
    """Send the Assembly's frozen description and schema for every function offered.

    The name says which tool; what it does and takes was decided at compile time, so a
    client can't widen a schema or reword a description the model will read.
    """
    def frozen(function: dict[str, Any]) -> dict[str, Any]:
        name = normalise_name(function["name"])
        if name in assembly.tools:
            grant = assembly.tools[name]
            out = {"name": function["name"], "description": grant.description, "parameters": grant.parameters}
        else:  # an MCP tool offered to the model: the client calls it through /mcp
            tool = assembly.mcp[name]
            out = {"name": function["name"], "description": tool.description, "parameters": tool.input_schema}
        if "strict" in function:
            out["strict"] = function["strict"]
        return out

    if isinstance(upstream.get("tools"), list):
        upstream["tools"] = [
            {**t, "function": frozen(t["function"])} if normalise_name(t["type"]) == "function" else t
            for t in upstream["tools"]
        ]
    if isinstance(upstream.get("functions"), list):
        upstream["functions"] = [frozen(f) for f in upstream["functions"]]


def _pin_params(model: ModelGrant, body: dict[str, Any], upstream: dict[str, Any]) -> None:
    for key, pinned in model.params.items():
        sent = body.get(key)
        if sent is None:  # absent or an explicit null ("the default"): the plan's value wins
            upstream[key] = pinned
        elif not _same(sent, pinned):
            shown = show(orjson.dumps(pinned).decode())
            raise denied(
                "pinned_param",
                f"'{key}' is pinned to {shown} by this session's plan and may not be changed",
                param=key,
            )


def _same(sent: object, pinned: object) -> bool:
    # True == 1 in Python, but a plan pinning 1 did not allow `true`.
    return sent == pinned and isinstance(sent, bool) == isinstance(pinned, bool)


def _cap_tokens(model: ModelGrant, endpoint: Endpoint, upstream: dict[str, Any]) -> int:
    if endpoint is Endpoint.EMBEDDINGS:
        return 0
    given = [key for key in _TOKEN_FIELDS if upstream.get(key) is not None]
    for key in given:
        value = upstream[key]
        if type(value) is not int or value < 1:
            raise invalid("invalid_param", f"'{key}' must be an integer of at least 1", param=key)
        if value > model.max_tokens:
            raise denied(
                "max_tokens_cap",
                f"'{key}' {value} is above this model's cap of {model.max_tokens}",
                param=key,
            )
    if given:
        return max(int(upstream[key]) for key in given)  # worst case, for the budget
    for key in _TOKEN_FIELDS:  # explicit nulls: OpenAI refuses both fields at once
        upstream.pop(key, None)
    upstream["max_tokens"] = model.max_tokens
    return model.max_tokens


def _check_sampling(model: ModelGrant, endpoint: Endpoint, upstream: dict[str, Any]) -> int:
    n = _count(upstream, "n", model.max_n)
    if endpoint is Endpoint.COMPLETIONS:
        n = max(n, _count(upstream, "best_of", model.max_n))
    if not model.allow_logprobs:
        for key in ("logprobs", "top_logprobs"):
            if _wants_logprobs(endpoint, key, upstream.get(key)):
                raise denied(
                    "logprobs_not_allowed", f"'{key}' is not allowed for this model", param=key
                )
    bias = upstream.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise invalid("invalid_param", "'logit_bias' must be an object", param="logit_bias")
    if bias and not model.allow_logit_bias:
        message = "'logit_bias' is not allowed for this model"
        raise denied("logit_bias_not_allowed", message, param="logit_bias")
    return n


def _count(upstream: dict[str, Any], key: str, cap: int) -> int:
    value = upstream.get(key)
    if value is None:
        return 1
    if type(value) is not int or value < 1:
        raise invalid("invalid_param", f"'{key}' must be an integer of at least 1", param=key)
    if value > cap:
        message = f"'{key}' {value} is above this model's limit of {cap}"
        raise denied("n_not_allowed", message, param=key)
    return value


def _wants_logprobs(endpoint: Endpoint, key: str, value: object) -> bool:
    if value is None or value is False:
        return False
    # Chat's `logprobs` is a flag; completions' is a count where even 0 returns the
    # chosen token's logprob; `top_logprobs` asks for them whatever its value.
    return key == "top_logprobs" or endpoint is Endpoint.COMPLETIONS or bool(value)


def _check_stream(upstream: dict[str, Any]) -> bool:
    stream = upstream.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("invalid_param", "'stream' must be a boolean", param="stream")
    options = upstream.get("stream_options")
    if options is not None:
        if not stream:
            message = "'stream_options' is only allowed with stream=true"
            raise invalid("invalid_param", message, param="stream_options")
        if not isinstance(options, dict):
            message = "'stream_options' must be an object"
            raise invalid("invalid_param", message, param="stream_options")
    return bool(stream)


def _candidate_steps(assembly: Assembly, model: str, functions: frozenset[str]) -> tuple[str, ...]:
    """Steps this request could be; which of them may come next is the session state's call."""
    if not assembly.steps:
        return ()
    fits = tuple(s.id for s in assembly.steps if s.model == model and functions.issubset(s.tools))
    if fits:
        return fits
    same_model = [s.id for s in assembly.steps if s.model == model]
    if same_model:
        offered = ", ".join(show(name) for name in sorted(functions))
        message = (
            f"no step of this session's plan uses model '{model}' with tools [{offered}]; "
            f"steps using this model: {', '.join(same_model)}"
        )
    else:
        same_model = [s.id for s in assembly.steps]
        message = (
            f"no step of this session's plan uses model '{model}'; steps: {', '.join(same_model)}"
        )
    raise StateConflict(message, extra={"rule": "no_step_fits", "steps": same_model})


def check_output(assembly: Assembly, grant: Grant, tool_names: Iterable[str]) -> None:
    """A tool call in the answer must be in the VCS and among the tools the request offered."""
    for raw in tool_names:
        name = normalise_name(raw)
        if not _granted_function(assembly, name):
            reason = "which is not in this session's VCS"
        elif name not in grant.tools:
            reason = "which this request did not offer"
        else:
            continue
        raise denied("output_tool_call", f"the model called tool '{show(name)}', {reason}")
