"""What an OpenAI request may carry: per-endpoint field allow-lists, upstream-override
keys, and the function and built-in tool names a chat request offers. Pure functions
used by the PEP (`policy.py`); each raises a GatewayError carrying `extra={"rule": ...}`.
"""

from __future__ import annotations

from typing import Any, Final

from gateway.errors import CapabilityDenied, InvalidRequest
from gateway.providers.base import Endpoint

_CHAT_FIELDS: Final = frozenset({
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "max_tokens", "max_completion_tokens", "n", "presence_penalty", "response_format",
    "seed", "service_tier", "stop", "stream", "stream_options", "temperature", "top_p",
    "tools", "tool_choice", "parallel_tool_calls", "user", "functions", "function_call",
    "metadata", "store", "reasoning_effort", "modalities", "audio", "prediction",
    "web_search_options", "verbosity", "safety_identifier", "prompt_cache_key",
})  # fmt: skip
_COMPLETION_FIELDS: Final = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
    "suffix", "temperature", "top_p", "user",
})  # fmt: skip
_EMBEDDING_FIELDS: Final = frozenset({"model", "input", "encoding_format", "dimensions", "user"})

ALLOWED_FIELDS: Final[dict[Endpoint, frozenset[str]]] = {
    Endpoint.CHAT: _CHAT_FIELDS,
    Endpoint.COMPLETIONS: _COMPLETION_FIELDS,
    Endpoint.EMBEDDINGS: _EMBEDDING_FIELDS,
}

# Content and schemas: a tool's JSON schema may well have a property called "url", and a
# prompt may say "api_key". `input`/`prompt` can be huge token arrays, never config.
CONTENT_FIELDS: Final = frozenset({
    "messages", "tools", "functions", "response_format", "tool_choice", "prediction",
    "input", "prompt",
})  # fmt: skip


def _canon(key: str) -> str:
    # "api_base", "API-Base", "apiBase" and " api base " configure the same knob somewhere
    # (LiteLLM, SDK extras, JS clients), so compare with every separator squashed.
    return key.strip().lower().replace("-", "").replace("_", "").replace(" ", "")


OVERRIDE_KEYS: Final = frozenset(_canon(k) for k in (
    "api_base", "base_url", "api_key", "api_version", "api_type", "organization",
    "deployment_id", "azure_deployment", "azure_endpoint", "custom_llm_provider", "provider",
    "user_config", "extra_headers", "headers", "litellm_params", "model_list", "endpoint",
    "url", "region_name", "aws_region_name", "vertex_project", "vertex_location", "proxy",
    "request_timeout",
))  # fmt: skip

_TOOL_CHOICE_MODES: Final = frozenset({"none", "auto", "required"})
_FUNCTION_CALL_MODES: Final = frozenset({"none", "auto"})


def normalise_name(name: str) -> str:
    """Names of models and tools compare trimmed and case-insensitively, as in the Assembly."""
    return name.strip().lower()


def show(text: str, limit: int = 64) -> str:
    """A client- or model-supplied name, cut short so an error can't be used to echo a blob."""
    return text if len(text) <= limit else text[:limit] + "..."


def denied(rule: str, message: str, *, param: str | None = None) -> CapabilityDenied:
    return CapabilityDenied(message, param=param, extra={"rule": rule})


def invalid(
    rule: str, message: str, *, param: str | None = None, code: str | None = None
) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code, extra={"rule": rule})


def is_override_key(key: object) -> bool:
    return isinstance(key, str) and _canon(key) in OVERRIDE_KEYS


def reject_overrides(body: dict[str, Any]) -> None:
    """Deny any field that could pick or configure an upstream, at the top or nested in
    a non-content field (`metadata`, `extra_body`, ...). Values are never echoed."""
    for key, value in body.items():
        if is_override_key(key):
            raise denied(
                "upstream_override",
                f"field '{show(key)}' may not choose or configure the upstream",
                param=key,
            )
        if key in CONTENT_FIELDS or not isinstance(value, dict | list):
            continue
        nested = _nested_override(value)
        if nested is not None:
            raise denied(
                "upstream_override",
                f"field '{show(key)}' carries '{show(nested)}', "
                "which may not choose or configure the upstream",
                param=key,
            )


def _nested_override(value: dict[str, Any] | list[Any]) -> str | None:
    # Iterative: a deeply nested body must not turn into a RecursionError (a 500).
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if is_override_key(key):
                    return str(key)
                if isinstance(child, dict | list):
                    stack.append(child)
        else:
            stack.extend(child for child in node if isinstance(child, dict | list))
    return None


REDACTED = "[redacted]"


def redact_overrides(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of `body` with the value of every override field replaced, wherever
    `reject_overrides` looks: such fields carry keys and URLs, which are never stored."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: REDACTED if is_override_key(k) else clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    return {
        k: REDACTED if is_override_key(k) else (v if k in CONTENT_FIELDS else clean(v))
        for k, v in body.items()
    }


def reject_unknown_fields(endpoint: Endpoint, body: dict[str, Any]) -> None:
    """Explicit rather than silently forwarded: an upstream may act on a field nobody checked."""
    allowed = ALLOWED_FIELDS[endpoint]
    for key in body:
        if key not in allowed:
            raise invalid(
                "unknown_parameter",
                f"unrecognized request argument '{show(str(key))}' for /v1/{endpoint}",
                param=str(key),
                code="unknown_parameter",
            )


def offered_tools(body: dict[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """(function names, built-in tool types) a chat request offers or forces, normalised."""
    functions: set[str] = set()
    builtins: set[str] = set()
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("invalid_tools", "'tools' must be a list", param="tools")
        for i, entry in enumerate(tools):
            _add_tool(entry, f"tools[{i}]", functions, builtins)
    legacy = body.get("functions")
    if legacy is not None:
        if not isinstance(legacy, list):
            raise invalid("invalid_tools", "'functions' must be a list", param="functions")
        for i, entry in enumerate(legacy):
            if not isinstance(entry, dict):
                message = f"functions[{i}] must be an object"
                raise invalid("invalid_tools", message, param="functions")
            functions.add(_name(entry.get("name"), f"functions[{i}].name"))
    _add_tool_choice(body.get("tool_choice"), functions, builtins)
    _add_function_call(body.get("function_call"), functions)
    if body.get("web_search_options") is not None:
        builtins.add("web_search")
    return frozenset(functions), frozenset(builtins)


def _add_tool(entry: object, where: str, functions: set[str], builtins: set[str]) -> None:
    if not isinstance(entry, dict):
        raise invalid("invalid_tools", f"{where} must be an object", param=where)
    kind = entry.get("type")
    if not isinstance(kind, str) or not kind.strip():
        raise invalid("invalid_tools", f"{where}.type must be a non-empty string", param=where)
    kind = normalise_name(kind)
    if kind != "function":
        builtins.add(kind)
        return
    function = entry.get("function")
    if not isinstance(function, dict):
        raise invalid("invalid_tools", f"{where}.function must be an object", param=where)
    functions.add(_name(function.get("name"), f"{where}.function.name"))


def _add_tool_choice(choice: object, functions: set[str], builtins: set[str]) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if normalise_name(choice) not in _TOOL_CHOICE_MODES:
            raise invalid(
                "invalid_tools",
                "'tool_choice' must be 'none', 'auto', 'required' or an object",
                param="tool_choice",
            )
        return
    if not isinstance(choice, dict):
        message = "'tool_choice' must be a string or an object"
        raise invalid("invalid_tools", message, param="tool_choice")
    kind = choice.get("type")
    if kind is None or (isinstance(kind, str) and normalise_name(kind) == "function"):
        # {"type": "function", "function": {"name"}}, or the flat {"name"} some clients send.
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
        functions.add(_name(name, "tool_choice.function.name"))
    elif not isinstance(kind, str) or not kind.strip():
        raise invalid("invalid_tools", "'tool_choice.type' must be a string", param="tool_choice")
    elif normalise_name(kind) == "allowed_tools":
        _add_allowed_tools(choice.get("allowed_tools"), functions, builtins)
    else:
        builtins.add(normalise_name(kind))


def _add_allowed_tools(allowed: object, functions: set[str], builtins: set[str]) -> None:
    tools = allowed.get("tools") if isinstance(allowed, dict) else None
    if not isinstance(tools, list):
        raise invalid(
            "invalid_tools", "'tool_choice.allowed_tools.tools' must be a list", param="tool_choice"
        )
    for i, entry in enumerate(tools):
        _add_tool(entry, f"tool_choice.allowed_tools.tools[{i}]", functions, builtins)


def _add_function_call(call: object, functions: set[str]) -> None:
    if call is None:
        return
    if isinstance(call, str):
        if normalise_name(call) not in _FUNCTION_CALL_MODES:
            raise invalid(
                "invalid_tools",
                "'function_call' must be 'none', 'auto' or an object",
                param="function_call",
            )
        return
    if not isinstance(call, dict):
        message = "'function_call' must be a string or an object"
        raise invalid("invalid_tools", message, param="function_call")
    functions.add(_name(call.get("name"), "function_call.name"))


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise invalid("invalid_tools", f"{where} must be a non-empty string", param=where)
    return normalise_name(value)
