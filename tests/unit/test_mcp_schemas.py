"""Frozen tool schemas: the compiled check of the plain subset never lets through what
jsonschema refuses, and anything outside the subset is left to jsonschema."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema.validators import validator_for  # type: ignore[import-untyped]

from gateway.mcp.schemas import first_error, plain_check

KEYS = st.sampled_from(["a", "b", "c"])
TYPES = st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array"])
NUMBERS = st.integers(-3, 3) | st.floats(-3, 3, allow_nan=False, allow_infinity=False)
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "x", "yy", "1"])
# Where JSON Schema and Python disagree: bools are ints in Python, 1.0 == 1, "" is falsy.
TRICKY: list[Any] = [None, True, False, 0, 1, -1, 1.0, 2.5, "", "x", "abcd", [], [1], [True, "x"], {}, {"a": 1}, {"d": None}]
VALUES = st.recursive(
    st.sampled_from(TRICKY) | SCALARS | NUMBERS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=10,
)
LEAVES = st.one_of(
    st.builds(lambda t: {"type": t}, TYPES | st.lists(TYPES, min_size=1, max_size=3)),
    st.builds(lambda k, n: {k: n}, st.sampled_from(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]), NUMBERS),
    st.builds(lambda k, n: {k: n}, st.sampled_from(["minLength", "maxLength", "minItems", "maxItems"]), st.integers(0, 3)),
    st.builds(lambda e: {"enum": e}, st.lists(SCALARS, min_size=1, max_size=3)),
    st.builds(lambda c: {"const": c}, SCALARS),
    st.just({}),
    st.just({"title": "T", "description": "d", "default": 1, "format": "date"}),
    st.just(True),
)


def _object(properties: dict[str, Any], required: list[str], additional: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if additional is not None:
        schema["additionalProperties"] = additional
    return schema


def _both(one: Any, other: Any) -> Any:
    return {**one, **other} if isinstance(one, dict) and isinstance(other, dict) else one


SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(_object, st.dictionaries(KEYS, inner, max_size=3), st.lists(KEYS, max_size=3), st.none() | st.just(False) | inner),
        st.builds(lambda item: {"type": "array", "items": item}, inner),
        st.builds(lambda branches: {"anyOf": branches}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(_both, inner, inner),
    ),
    max_leaves=8,
)


def jsonschema_valid(schema: Any, value: Any) -> bool:
    return not any(validator_for(schema)(schema).iter_errors(value))


@settings(max_examples=400, deadline=None)
@given(schema=SCHEMAS, value=VALUES)
def test_the_plain_check_never_passes_a_value_jsonschema_refuses(schema: Any, value: Any) -> None:
    check = plain_check(schema)
    assert check is not None  # every schema drawn here is in the subset
    if check(value):
        assert jsonschema_valid(schema, value)
    if isinstance(schema, dict):
        assert (first_error(schema, value) is None) == jsonschema_valid(schema, value)


@pytest.mark.parametrize("schema", [
    *({"type": t} for t in ("string", "integer", "number", "boolean", "null", "object", "array")),
    {"type": ["integer", "null"]}, {"minimum": 1}, {"maximum": 0}, {"exclusiveMinimum": 1}, {"exclusiveMaximum": 1.0},
    {"minLength": 1}, {"maxLength": 1}, {"minItems": 1}, {"maxItems": 0}, {"enum": [1, "x", None]}, {"enum": [True]},
    {"const": 1}, {"const": False}, {"required": ["a"]}, {"properties": {"a": {"type": "string"}}},
    {"properties": {"a": {}}, "additionalProperties": False}, {"additionalProperties": {"type": "integer"}},
    {"items": {"type": "integer"}}, {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
])
def test_each_keyword_of_the_plain_check_passes_only_what_jsonschema_passes(schema: dict[str, Any]) -> None:
    check = plain_check(schema)
    assert check is not None
    for value in TRICKY:
        if check(value):
            assert jsonschema_valid(schema, value), value


def test_the_schemas_sdks_generate_take_the_plain_path() -> None:
    # As the Python SDK writes them (pydantic) and as the TypeScript one does (zod, draft 7).
    pydantic = {
        "type": "object", "title": "getOrderArguments", "required": ["order_id"],
        "properties": {
            "order_id": {"type": "string", "title": "Order Id"},
            "n": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None, "title": "N"},
        },
    }
    zod = {
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
        "properties": {"city": {"type": "string", "minLength": 1}, "days": {"type": "number", "maximum": 7}},
        "required": ["city"],
    }
    for schema, good, bad in (
        (pydantic, {"order_id": "A", "n": None}, {"order_id": "A", "n": "2"}),
        (zod, {"city": "Oslo", "days": 3}, {"city": "Oslo", "extra": 1}),
    ):
        check = plain_check(schema)
        assert check is not None and check(good) is True and check(bad) is False
        assert first_error(schema, good) is None
        assert first_error(schema, bad) is not None


def test_keywords_outside_the_subset_leave_the_verdict_and_the_message_to_jsonschema() -> None:
    for schema in (
        {"type": "string", "pattern": "^a"},
        {"$defs": {"x": {"type": "string"}}, "$ref": "#/$defs/x"},
        {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer"},
        {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 2}}},
        {"type": "strin"},
    ):
        assert plain_check(schema) is None
    error = first_error({"type": "string", "pattern": "^a"}, "b")
    assert error is not None and "does not match" in error.message
    assert first_error({"type": "string", "pattern": "^a"}, "abc") is None
    assert first_error({"type": "integer"}, 2.0) is None  # an integral float is an integer: jsonschema says so
