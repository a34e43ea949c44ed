"""Strict JSON bodies: an object, bounded depth, and no key twice in any object, however
the key is spelled (escapes included); checked against the standard parser as an oracle."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidRequest
from gateway.pipeline.request_body import MAX_DEPTH, parse_body


def duplicate_param(raw: bytes) -> str | None:
    with pytest.raises(InvalidRequest) as caught:
        parse_body(raw)
    assert caught.value.status == 400 and caught.value.code == "duplicate_key"
    assert caught.value.param is not None and caught.value.param in caught.value.message
    return caught.value.param


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "gpt-4o", "model": "gpt-4o-mini"}', "model"),
        (b'{"mo\\u0064el": "gpt-4o", "model": "gpt-4o-mini"}', "model"),
        (b'{"model": "a", "MODEL": "b", "model": "c"}', "model"),
        (b'{"messages": [{"role": "user", "content": "x", "role": "system"}]}', "messages[0].role"),
        (b'{"a": [1, {"b": [{"c": 1}, {"c": 1, "c": 2}]}]}', "a[1].b[1].c"),
        (b'{"metadata": {"k": "1", "\\u006b": "2"}}', "metadata.k"),
        (b'{"a": 1, "a": 2, "b": "\\u003a"}', "a"),  # an escaped colon does not hide it
        (b'{"a:": 1, "a\\u003A": 2}', "a:"),
        (b'{"x": {"y": 1, "y": 2}, "x": 3}', "x"),  # the outer repeat is the one named
    ],
)
def test_a_repeated_key_at_any_depth_is_400_naming_its_path(raw: bytes, param: str) -> None:
    assert duplicate_param(raw) == param


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a: b"}]}',
        b'{"a": {"k": 1}, "b": {"k": 1}, "c": [{"k": 1}, {"k": 2}]}',  # same key, other objects
        b'{"a": "\\u003a", "b": "\\\\u003a", "c": "http://x:80"}',
        b'{"k": 1, "K": 2, "k ": 3}',
        b"{}",
    ],
)
def test_bodies_without_repeats_parse_as_orjson_reads_them(raw: bytes) -> None:
    assert parse_body(raw) == orjson.loads(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b"nope", b'{"a": NaN}', b'{"a": 1,}', b"\xff"])
def test_malformed_json_is_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_body(raw)
    assert caught.value.code == "invalid_json"


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"3", b"null"])
def test_a_body_that_is_not_an_object_is_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_body(raw)


def test_nesting_past_the_limit_is_400() -> None:
    assert parse_body(b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1))
    with pytest.raises(InvalidRequest) as caught:
        parse_body(b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1))
    assert caught.value.code == "invalid_json"


# --- property: parse_body refuses exactly the bodies with a repeated key ---------------

# Few, short keys so repeats are common; ':' and escapes of it so the fast path is tested.
KEYS = st.sampled_from(["a", "b", "a:", ":", "model", "k\u00e9"])
TEXT = st.text(alphabet="ab:\\\"\u00e9 ", max_size=6)
SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | TEXT


def objects(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(st.tuples(KEYS, children), max_size=4).map(Pairs)


class Pairs(list[tuple[str, Any]]):
    """A JSON object as written, repeats and all."""


TREES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | objects(c), max_leaves=12)


def encode(node: Any, escapes: st.DataObject) -> str:
    if isinstance(node, Pairs):
        return "{" + ",".join(f"{encode_str(k, escapes)}:{encode(v, escapes)}" for k, v in node) + "}"
    if isinstance(node, list):
        return "[" + ",".join(encode(v, escapes) for v in node) + "]"
    if isinstance(node, str):
        return encode_str(node, escapes)
    return json.dumps(node)


def encode_str(text: str, escapes: st.DataObject) -> str:
    out = json.dumps(text, ensure_ascii=escapes.draw(st.booleans()))
    # Spell some characters as \uXXXX (either case), as a hostile client might.
    if escapes.draw(st.booleans()):
        out = out.replace(":", "\\u003" + escapes.draw(st.sampled_from("aA")))
    if escapes.draw(st.booleans()):
        out = out.replace("d", "\\u0064")
    return out


def has_repeat(raw: bytes) -> bool:
    found = False

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        keys = [k for k, _ in pairs]
        found = found or len(keys) != len(set(keys))
        return dict(pairs)

    json.loads(raw, object_pairs_hook=hook)
    return found


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEYS, TREES), max_size=5).map(Pairs), st.data())
def test_parse_body_refuses_exactly_the_bodies_with_a_repeated_key(tree: Pairs, data: st.DataObject) -> None:
    raw = encode(tree, data).encode()
    if has_repeat(raw):
        duplicate_param(raw)
    else:
        assert parse_body(raw) == json.loads(raw)
