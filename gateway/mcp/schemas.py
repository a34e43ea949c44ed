"""Values checked against frozen JSON Schemas (tool arguments, structured results), each
schema compiled once.

jsonschema is the judge: every error message is its own, and a schema using any keyword
outside a plain subset is checked by it alone. For that subset (types, properties,
required, additionalProperties, items, enum and const of scalars, numeric and length
bounds, anyOf, annotations: what SDKs generate for plain tools) a compiled predicate
answers first. It may only say "valid" where jsonschema would; whatever it does not
accept goes to jsonschema for the verdict and the message, so a value it misjudges as
invalid costs time, never a wrong answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["first_error", "plain_check"]

Check = Callable[[Any], bool]

# Keywords that assert nothing (format too: the validator is built without a format checker).
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
    "format", "contentMediaType", "contentEncoding",
})
# Drafts whose reading of the subset is the same (draft 4's boolean exclusiveMinimum differs).
_DRAFTS = frozenset({
    "http://json-schema.org/draft-07/schema", "https://json-schema.org/draft/2019-09/schema",
    "https://json-schema.org/draft/2020-12/schema",
})
# Exact Python types as orjson reads JSON; bool is never a number here (nor in JSON Schema).
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "null": (type(None),), "object": (dict,), "array": (list,),
}
_SCALARS = (str, int, bool, type(None))
_NUMBERS = (int, float)
_CACHED = 1024


def first_error(schema: dict[str, Any], value: Any) -> Any:
    """jsonschema's first ValidationError of `value` against `schema`; None if it is valid."""
    checks = _compiled(schema)
    if checks.plain is not None and checks.plain(value):
        return None
    return next(iter(checks.validator().iter_errors(value)), None)


class _Checks:
    __slots__ = ("_validator", "plain", "schema")

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema  # held: the cache is keyed by its id
        self.plain = plain_check(schema)
        self._validator: Any = None

    def validator(self) -> Any:
        if self._validator is None:
            self._validator = _validator(orjson.dumps(self.schema, option=orjson.OPT_SORT_KEYS))
        return self._validator


# By the schema object's id: a frozen Assembly is cached and its schemas with it, so the
# lookup costs no serialisation; each entry holds its schema, so no id is reused meanwhile.
_by_id: dict[int, _Checks] = {}


def _compiled(schema: dict[str, Any]) -> _Checks:
    checks = _by_id.get(id(schema))
    if checks is None or checks.schema is not schema:
        if len(_by_id) >= _CACHED:
            _by_id.clear()
        checks = _by_id[id(schema)] = _Checks(schema)
    return checks


@functools.lru_cache(maxsize=_CACHED)
def _validator(schema_json: bytes) -> Any:
    # Compiling a validator costs far more than using one: once per frozen schema.
    # jsonschema is imported on first use, like the MCP SDK: only plans with MCP tools need it.
    from jsonschema.validators import validator_for  # type: ignore[import-untyped]
    from referencing import Registry

    schema = orjson.loads(schema_json)
    cls: Any = validator_for(schema)
    # An empty registry: a $ref resolves inside the schema, never over the network.
    return cls(schema, registry=Registry())


def plain_check(schema: Any, top: bool = True) -> Check | None:
    """A predicate true only of values valid against `schema`; None when the schema uses
    anything outside the plain subset (then jsonschema alone decides)."""
    if schema is True:
        return _always
    if not isinstance(schema, dict):
        return None
    checks: list[Check] = []
    for key, arg in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$schema" and top and isinstance(arg, str) and arg.rstrip("#") in _DRAFTS:
            continue
        check = _keyword(key, arg, schema)
        if check is None:
            return None
        checks.append(check)
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    every = tuple(checks)

    def all_of(v: Any) -> bool:  # loops, not all(generator): this runs on every call
        for check in every:
            if not check(v):
                return False
        return True

    return all_of


def _always(value: Any) -> bool:
    return True


def _keyword(key: str, arg: Any, schema: dict[str, Any]) -> Check | None:
    if key == "type":
        names = [arg] if isinstance(arg, str) else arg
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in _TYPES for n in names):
            return None
        types = frozenset(t for n in names for t in _TYPES[n])
        return lambda v: type(v) in types
    if key == "properties":
        if not isinstance(arg, dict):
            return None
        props: list[tuple[str, Check]] = []
        for name, sub in arg.items():
            check = plain_check(sub, top=False)
            if check is None:
                return None
            props.append((name, check))
        known_props = tuple(props)

        def properties(v: Any) -> bool:
            if type(v) is dict:
                for name, check in known_props:
                    if name in v and not check(v[name]):
                        return False
            return True

        return properties
    if key == "required":
        if not isinstance(arg, list) or not all(isinstance(n, str) for n in arg):
            return None
        needed = tuple(arg)
        def required(v: Any) -> bool:
            if type(v) is dict:
                for name in needed:
                    if name not in v:
                        return False
            return True

        return required
    if key == "additionalProperties":
        known = schema.get("properties", {})
        if not isinstance(known, dict) or "patternProperties" in schema:
            return None
        if arg is False:
            return lambda v: type(v) is not dict or all(k in known for k in v)
        extra = plain_check(arg, top=False)
        if extra is None:
            return None
        return lambda v: type(v) is not dict or all(k in known or extra(x) for k, x in v.items())
    if key == "items":
        item = plain_check(arg, top=False) if "prefixItems" not in schema else None
        if item is None:
            return None
        return lambda v: type(v) is not list or all(item(x) for x in v)
    if key in ("enum", "const"):
        allowed = arg if key == "enum" else [arg]
        if not isinstance(allowed, list) or not all(type(a) in _SCALARS for a in allowed):
            return None
        return lambda v: any(type(a) is type(v) and a == v for a in allowed)
    if key == "anyOf":
        options: list[Check] = []
        for branch in arg if isinstance(arg, list) and arg else [None]:
            check = plain_check(branch, top=False)
            if check is None:
                return None
            options.append(check)
        return lambda v: any(b(v) for b in options)
    return _bound(key, arg)


def _bound(key: str, arg: Any) -> Check | None:
    if type(arg) not in _NUMBERS:
        return None
    if key == "minimum":
        return lambda v: type(v) not in _NUMBERS or v >= arg
    if key == "maximum":
        return lambda v: type(v) not in _NUMBERS or v <= arg
    if key == "exclusiveMinimum":
        return lambda v: type(v) not in _NUMBERS or v > arg
    if key == "exclusiveMaximum":
        return lambda v: type(v) not in _NUMBERS or v < arg
    if type(arg) is not int or arg < 0:
        return None
    if key == "minLength":
        return lambda v: type(v) is not str or len(v) >= arg
    if key == "maxLength":
        return lambda v: type(v) is not str or len(v) <= arg
    if key == "minItems":
        return lambda v: type(v) is not list or len(v) >= arg
    if key == "maxItems":
        return lambda v: type(v) is not list or len(v) <= arg
    return None
