"""The shape of an OpenAI request, per endpoint: the types, ranges and required fields of
the documented fields (which fields may appear at all is `request_fields`' allow-list).
Hand-written checks rather than a model: they run on every request, in a few microseconds.
Each error is a 400 naming the first offending field by its path (`messages[2].role`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from gateway.errors import InvalidRequest
from gateway.pipeline.request_fields import invalid
from gateway.providers.base import Endpoint

__all__ = ["check_shape"]

Check = Callable[[str, Any], None]  # (param path, value) -> None, or raises InvalidRequest

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
_MAX_EMBEDDING_INPUTS: Final = 2048
ROLES: Final = ("system", "developer", "user", "assistant", "tool", "function")


def check_shape(endpoint: Endpoint, body: dict[str, Any]) -> None:
    """Raise InvalidRequest at the first field of `body` that breaks `endpoint`'s schema.
    An explicit null is the field's default, except for required fields. `model` is the
    PEP's to check; fields outside the allow-list were refused before this runs."""
    for key in _REQUIRED[endpoint]:
        if body.get(key) is None:
            raise _bad(key, f"'{key}' is required", "missing_required_parameter")
    checks = _CHECKS[endpoint]
    for key, value in body.items():
        if value is not None:
            check = checks.get(key)
            if check is not None:
                check(key, value)


def _bad(param: str, message: str, code: str = "invalid_type", rule: str = "invalid_param") -> InvalidRequest:
    return invalid(rule, message, param=param, code=code)


# --- scalars --------------------------------------------------------------------------


def _boolean(param: str, value: Any) -> None:
    if type(value) is not bool:
        raise _bad(param, f"'{param}' must be a boolean")


def _string(param: str, value: Any) -> None:
    if type(value) is not str:
        raise _bad(param, f"'{param}' must be a string")


def _object(param: str, value: Any) -> None:
    if type(value) is not dict:
        raise _bad(param, f"'{param}' must be an object")


def _number(low: float, high: float) -> Check:
    def check(param: str, value: Any) -> None:
        if type(value) is not float and type(value) is not int:  # bool is not a number here
            raise _bad(param, f"'{param}' must be a number")
        if not low <= value <= high:
            raise _bad(param, f"'{param}' must be between {low:g} and {high:g}", "invalid_value")

    return check


def _integer(low: int, high: int = INT64_MAX) -> Check:
    if low == INT64_MIN:
        limits = "within the signed 64-bit range"
    else:
        limits = f"of at least {low}" if high == INT64_MAX else f"between {low} and {high}"

    def check(param: str, value: Any) -> None:
        if type(value) is not int:
            raise _bad(param, f"'{param}' must be an integer")
        if not low <= value <= high:
            raise _bad(param, f"'{param}' must be an integer {limits}", "invalid_value")

    return check


def _one_of(*allowed: str) -> Check:
    choices = frozenset(allowed)
    shown = ", ".join(f"'{a}'" for a in allowed)

    def check(param: str, value: Any) -> None:
        if type(value) is not str or value not in choices:
            raise _bad(param, f"'{param}' must be one of {shown}", "invalid_value")

    return check


def _strings(param: str, value: Any) -> None:
    if type(value) is not list or not set(map(type, value)) <= {str}:
        raise _bad(param, f"'{param}' must be a list of strings")


def _string_map(param: str, value: Any) -> None:
    if type(value) is not dict or not set(map(type, value.values())) <= {str}:
        raise _bad(param, f"'{param}' must be an object whose values are strings")


def _stop(param: str, value: Any) -> None:
    if type(value) is str:
        return
    if type(value) is not list or len(value) > 4 or not set(map(type, value)) <= {str}:
        raise _bad(param, f"'{param}' must be a string or a list of at most 4 strings")


def _logit_bias(param: str, value: Any) -> None:
    if type(value) is not dict:
        raise _bad(param, f"'{param}' must be an object")
    for bias in value.values():
        if (type(bias) is not int and type(bias) is not float) or not -100 <= bias <= 100:
            raise _bad(param, f"'{param}' values must be numbers between -100 and 100", "invalid_value")


def _stream_options(param: str, value: Any) -> None:
    _object(param, value)
    for key in ("include_usage", "include_obfuscation"):
        if value.get(key) is not None:
            _boolean(f"{param}.{key}", value[key])


_FORMAT_TYPE: Final = _one_of("text", "json_object", "json_schema")
_IMAGE_DETAIL: Final = _one_of("auto", "low", "high")


def _response_format(param: str, value: Any) -> None:
    _object(param, value)
    _FORMAT_TYPE(f"{param}.type", value.get("type"))
    if value["type"] != "json_schema":
        return
    spec = value.get("json_schema")
    where = f"{param}.json_schema"
    _object(where, spec)
    _string(f"{where}.name", spec.get("name"))
    _optional(spec, where, schema=_object, strict=_boolean, description=_string)


def _optional(node: dict[str, Any], where: str, **checks: Check) -> None:
    """Check the fields of `node` that are present and not null."""
    for key, check in checks.items():
        value = node.get(key)
        if value is not None:
            check(f"{where}.{key}", value)


# --- tools ----------------------------------------------------------------------------
# Their names, types and choices are `request_fields.offered_tools`' (the PEP reads them);
# here, the rest of each definition. Errors carry the same rule, "invalid_tools".


def _tool_list(param: str, value: Any) -> None:
    if type(value) is not list:
        raise _bad(param, f"'{param}' must be a list", rule="invalid_tools")
    for i, entry in enumerate(value):
        if type(entry) is not dict:
            raise _bad(f"{param}[{i}]", f"{param}[{i}] must be an object", rule="invalid_tools")
        function = entry.get("function") if param == "tools" else entry
        if type(function) is dict:
            where = f"{param}[{i}].function" if param == "tools" else f"{param}[{i}]"
            _function_definition(where, function)


def _function_definition(where: str, function: dict[str, Any]) -> None:
    description, parameters, strict = function.get("description"), function.get("parameters"), function.get("strict")
    if description is not None and type(description) is not str:
        raise _bad(f"{where}.description", f"{where}.description must be a string", rule="invalid_tools")
    if parameters is not None and type(parameters) is not dict:
        raise _bad(f"{where}.parameters", f"{where}.parameters must be an object", rule="invalid_tools")
    if strict is not None and type(strict) is not bool:
        raise _bad(f"{where}.strict", f"{where}.strict must be a boolean", rule="invalid_tools")


# --- messages -------------------------------------------------------------------------


# The common message, {"role": <one of these>, "content": "<text>"}, needs no more checks.
_PLAIN_ROLES: Final = ("user", "system", "assistant", "developer")


def _messages(param: str, value: Any) -> None:
    if type(value) is not list:
        raise _bad(param, "'messages' must be a list of message objects")
    if not value:
        raise _bad(param, "'messages' must not be empty", "empty_array")
    for i, message in enumerate(value):
        if type(message) is not dict:
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object")
        role = message.get("role")
        if len(message) == 2 and type(message.get("content")) is str and role in _PLAIN_ROLES:
            continue  # a tuple, not a set: `role` may be unhashable
        check = _ROLE_CHECKS.get(role) if type(role) is str else None
        where = f"messages[{i}]"
        if check is None:
            allowed = ", ".join(f"'{r}'" for r in ROLES)
            raise _bad(f"{where}.role", f"{where}.role must be one of {allowed}", "invalid_value")
        check(where, message)
        name = message.get("name")
        if name is not None and type(name) is not str:
            raise _bad(f"{where}.name", f"{where}.name must be a string")


def _content(where: str, content: Any, parts: frozenset[str]) -> None:
    """A string, or a non-empty list of content parts of the role's allowed types."""
    if type(content) is str:
        return
    param = f"{where}.content"
    if content is None:
        raise _bad(param, f"{param} is required", "missing_required_parameter")
    if type(content) is not list:
        raise _bad(param, f"{param} must be a string or a list of content parts")
    if not content:
        raise _bad(param, f"{param} must not be empty", "empty_array")
    for j, part in enumerate(content):
        kind = part.get("type") if type(part) is dict else None
        if type(kind) is not str or kind not in parts:
            allowed = ", ".join(f"'{p}'" for p in sorted(parts))
            raise _bad(f"{param}[{j}]", f"{param}[{j}] must be an object of type {allowed}", "invalid_value")
        _PART_CHECKS[kind](f"{param}[{j}].{kind}", part.get(kind))


def _image_url(param: str, value: Any) -> None:
    _object(param, value)
    _string(f"{param}.url", value.get("url"))
    _optional(value, param, detail=_IMAGE_DETAIL)


def _input_audio(param: str, value: Any) -> None:
    _object(param, value)
    _string(f"{param}.data", value.get("data"))
    _string(f"{param}.format", value.get("format"))


def _file(param: str, value: Any) -> None:
    _object(param, value)
    _optional(value, param, file_data=_string, file_id=_string, filename=_string)


_PART_CHECKS: Final[dict[str, Check]] = {
    "text": _string,
    "refusal": _string,
    "image_url": _image_url,
    "input_audio": _input_audio,
    "file": _file,
}
_TEXT: Final = frozenset({"text"})
_USER_PARTS: Final = frozenset({"text", "image_url", "input_audio", "file"})
_ASSISTANT_PARTS: Final = frozenset({"text", "refusal"})


def _instructions(where: str, message: dict[str, Any]) -> None:  # system, developer
    _content(where, message.get("content"), _TEXT)


def _user(where: str, message: dict[str, Any]) -> None:
    _content(where, message.get("content"), _USER_PARTS)


def _assistant(where: str, message: dict[str, Any]) -> None:
    content = message.get("content")
    calls = message.get("tool_calls")
    legacy = message.get("function_call")
    # Content may be left out only by a message that calls something instead.
    if content is not None or not (calls or legacy is not None or message.get("audio") is not None):
        _content(where, content, _ASSISTANT_PARTS)
    if calls is not None:
        if type(calls) is not list:
            raise _bad(f"{where}.tool_calls", f"{where}.tool_calls must be a list")
        for k, call in enumerate(calls):
            _tool_call(f"{where}.tool_calls[{k}]", call)
    if legacy is not None:
        _called_function(f"{where}.function_call", legacy)
    _optional(message, where, refusal=_string, audio=_object)


def _tool_call(where: str, call: Any) -> None:
    _object(where, call)
    _string(f"{where}.id", call.get("id"))
    kind = call.get("type", "function")
    _string(f"{where}.type", kind)
    if kind == "function":
        _called_function(f"{where}.function", call.get("function"))
    else:
        _object(f"{where}.{kind}", call.get(kind))


def _called_function(where: str, function: Any) -> None:
    _object(where, function)
    _string(f"{where}.name", function.get("name"))
    _string(f"{where}.arguments", function.get("arguments"))


def _tool_result(where: str, message: dict[str, Any]) -> None:
    _content(where, message.get("content"), _TEXT)
    _string(f"{where}.tool_call_id", message.get("tool_call_id"))


def _function_result(where: str, message: dict[str, Any]) -> None:
    _string(f"{where}.name", message.get("name"))
    _optional(message, where, content=_string)


_ROLE_CHECKS: Final[dict[str, Callable[[str, dict[str, Any]], None]]] = {
    "system": _instructions,
    "developer": _instructions,
    "user": _user,
    "assistant": _assistant,
    "tool": _tool_result,
    "function": _function_result,
}


# --- prompts and inputs ---------------------------------------------------------------


def _token_ids(value: list[Any]) -> bool:
    return set(map(type, value)) == {int} and min(value) >= 0


def _prompt(param: str, value: Any, *, max_items: int | None = None, empty_text: bool = True) -> None:
    """A string, or a non-empty list of strings, of token ids, or of lists of token ids."""
    if type(value) is str:
        if not value and not empty_text:
            raise _bad(param, f"'{param}' must not be an empty string", "invalid_value")
        return
    if type(value) is not list:
        raise _bad(param, f"'{param}' must be a string, a list of strings or a list of token ids")
    if not value:
        raise _bad(param, f"'{param}' must not be empty", "empty_array")
    if max_items is not None and len(value) > max_items:
        raise _bad(param, f"'{param}' holds at most {max_items} items", "invalid_value")
    kinds = set(map(type, value))
    if kinds == {str}:
        if not empty_text and not all(value):
            raise _bad(param, f"'{param}' must not hold empty strings", "invalid_value")
    elif kinds == {int}:
        if min(value) < 0:
            raise _bad(param, f"'{param}' token ids must not be negative", "invalid_value")
    elif kinds != {list} or not all(item and _token_ids(item) for item in value):
        raise _bad(
            param,
            f"'{param}' must be a string, or a non-empty list of strings, of token ids "
            "or of non-empty lists of token ids",
        )


def _embedding_input(param: str, value: Any) -> None:
    _prompt(param, value, max_items=_MAX_EMBEDDING_INPUTS, empty_text=False)


_SAMPLING: Final[dict[str, Check]] = {
    "frequency_penalty": _number(-2, 2),
    "presence_penalty": _number(-2, 2),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "n": _integer(1, 128),
    "seed": _integer(INT64_MIN),
    "max_tokens": _integer(1),
    "logit_bias": _logit_bias,
    "stop": _stop,
    "stream": _boolean,
    "stream_options": _stream_options,
    "user": _string,
}
_CHECKS: Final[dict[Endpoint, dict[str, Check]]] = {
    Endpoint.CHAT: {
        **_SAMPLING,
        "messages": _messages,
        "max_completion_tokens": _integer(1),
        "logprobs": _boolean,
        "top_logprobs": _integer(0, 20),
        "response_format": _response_format,
        "tools": _tool_list,
        "functions": _tool_list,
        "parallel_tool_calls": _boolean,
        "store": _boolean,
        "metadata": _string_map,
        "modalities": _strings,
        "audio": _object,
        "prediction": _object,
        "web_search_options": _object,
        "service_tier": _string,
        "reasoning_effort": _string,
        "verbosity": _string,
        "safety_identifier": _string,
        "prompt_cache_key": _string,
    },
    Endpoint.COMPLETIONS: {
        **_SAMPLING,
        "prompt": _prompt,
        "best_of": _integer(1, 20),
        "echo": _boolean,
        "logprobs": _integer(0, 5),
        "suffix": _string,
    },
    Endpoint.EMBEDDINGS: {
        "input": _embedding_input,
        "encoding_format": _one_of("float", "base64"),
        "dimensions": _integer(1),
        "user": _string,
    },
}
_REQUIRED: Final[dict[Endpoint, tuple[str, ...]]] = {
    Endpoint.CHAT: ("messages",),
    Endpoint.COMPLETIONS: ("prompt",),
    Endpoint.EMBEDDINGS: ("input",),
}
