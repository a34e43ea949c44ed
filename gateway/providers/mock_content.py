"""What the `mock` provider says: deterministic answers, tool arguments and embeddings.

Everything here is a pure function of the request body; no clock, no RNG, no global state.
`gateway.providers.mock` wraps these answers in OpenAI's response and chunk shapes.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.tokenizer import count_text, get_encoding

# Fields that don't change what the mock says: streaming is a transport choice, `n` only adds
# choices and a token limit only truncates, so choice 0 of any variant is a prefix of the plain one.
NON_CONTENT_KEYS = frozenset(
    {"stream", "stream_options", "n", "max_tokens", "max_completion_tokens"}
)
MIN_ANSWER_TOKENS = 20
# Sentences are added until the target is reached; a sentence is ~8 tokens, so answers stay <= ~60.
ANSWER_TOKEN_SPAN = 31
SNIPPET_TOKENS = 12
MAX_CHOICES = 128
MAX_DIMENSIONS = 8192
_SCHEMA_MAX_DEPTH = 8

_DETERMINERS = ("the", "every", "each", "this", "one", "that")
_ADJECTIVES = (
    "careful", "frozen", "quiet", "steady", "bright", "patient", "simple", "precise",
    "curious", "gentle", "rapid", "modest", "clever", "tidy", "honest", "calm",
)
_NOUNS = (
    "gateway", "model", "plan", "session", "budget", "journal", "token", "request",
    "answer", "step", "policy", "replica", "stream", "ledger", "router", "assembly",
)
_VERBS = (
    "checks", "records", "follows", "answers", "guards", "measures", "carries", "reviews",
    "settles", "routes", "explains", "keeps", "signs", "replays", "counts", "trusts",
)


class Picker:
    """Deterministic integers from SHA-256 in counter mode: identical on every platform and run."""

    __slots__ = ("_seed", "_counter", "_pool")

    def __init__(self, seed: bytes, stream: int = 0) -> None:
        self._seed = seed + stream.to_bytes(4, "big")
        self._counter = 0
        self._pool = b""

    def _block(self) -> bytes:
        block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
        self._counter += 1
        return block

    def below(self, n: int) -> int:
        if len(self._pool) < 4:
            self._pool += self._block()
        value, self._pool = int.from_bytes(self._pool[:4], "big"), self._pool[4:]
        return value % n

    def hex(self, length: int) -> str:
        return self._block().hex()[:length]


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    name: str
    parameters: dict[str, Any]
    legacy: bool  # offered as legacy `functions`: answered with `function_call`


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    legacy: bool


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str | None  # None when the choice is a tool call
    tool_call: ToolCall | None
    finish_reason: str
    completion_tokens: int


def canonical(body: dict[str, Any], *, without: frozenset[str]) -> bytes:
    kept = {k: v for k, v in body.items() if k not in without}
    return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)


def content_seed(body: dict[str, Any]) -> bytes:
    return hashlib.sha256(canonical(body, without=NON_CONTENT_KEYS)).digest()


def int_param(body: dict[str, Any], key: str, *, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{key} must be an integer from {low} to {high}", param=key)
    return value


def token_limit(body: dict[str, Any]) -> int | None:
    """`max_completion_tokens` supersedes the deprecated `max_tokens`, as in OpenAI's API."""
    limit = int_param(body, "max_completion_tokens", low=0, high=10**9)
    return limit if limit is not None else int_param(body, "max_tokens", low=0, high=10**9)


def choice_count(body: dict[str, Any]) -> int:
    return int_param(body, "n", low=1, high=MAX_CHOICES) or 1


def truncate_tokens(text: str, encoding: str, limit: int | None) -> tuple[str, int, bool]:
    """(kept text, its token count, whether it was cut) for at most `limit` tokens."""
    enc = get_encoding(encoding)
    tokens = enc.encode(text, disallowed_special=())
    if limit is None or len(tokens) <= limit:
        return text, len(tokens), False
    kept = tokens[:limit]
    while kept:  # never end inside a multi-byte character
        try:
            return enc.decode_bytes(kept).decode("utf-8"), len(kept), True
        except UnicodeDecodeError:
            kept = kept[:-1]
    return "", 0, True


def text_pieces(text: str, encoding: str) -> list[str]:
    """`text` split about one token per piece; pieces join back to exactly `text`."""
    enc = get_encoding(encoding)
    pieces: list[str] = []
    pending = b""
    for token in enc.encode(text, disallowed_special=()):
        pending += enc.decode_single_token_bytes(token)
        try:
            pieces.append(pending.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a character split across tokens: wait for its other bytes
        pending = b""
    return pieces


def _sentence(picker: Picker) -> str:
    words = (
        _DETERMINERS[picker.below(len(_DETERMINERS))],
        _ADJECTIVES[picker.below(len(_ADJECTIVES))],
        _NOUNS[picker.below(len(_NOUNS))],
        _VERBS[picker.below(len(_VERBS))],
        _DETERMINERS[picker.below(len(_DETERMINERS))],
        _ADJECTIVES[picker.below(len(_ADJECTIVES))],
        _NOUNS[picker.below(len(_NOUNS))],
    )
    return " ".join(words).capitalize() + "."


def prose(lead: str, picker: Picker, encoding: str) -> str:
    target = MIN_ANSWER_TOKENS + picker.below(ANSWER_TOKEN_SPAN)
    text = lead + _sentence(picker)
    while count_text(text, encoding) < target:
        text += " " + _sentence(picker)
    return text


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def _snippet(content: Any, encoding: str) -> str:
    flat = " ".join(_plain_text(content).split())
    kept, _, cut = truncate_tokens(flat, encoding, SNIPPET_TOKENS)
    return kept.rstrip() + "..." if cut else kept


def _lead(messages: list[Any], encoding: str) -> str:
    """Echo what the answer responds to, so demos show the mock heard the request."""
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") in ("tool", "function"):
        return f'The tool returned "{_snippet(last.get("content"), encoding)}". '
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            snippet = _snippet(message.get("content"), encoding)
            return f'You said: "{snippet}". ' if snippet else ""
    return ""


def fill_schema(
    schema: Any, picker: Picker, *, name: str = "value", root: Any = None, depth: int = 0
) -> Any:
    """A value of the JSON Schema's type; objects get their required properties (or all)."""
    root = schema if root is None else root
    if depth > _SCHEMA_MAX_DEPTH or not isinstance(schema, dict):
        return None  # a recursive $ref or a malformed schema: stop rather than loop

    def inner(sub: Any, sub_name: str = name) -> Any:
        return fill_schema(sub, picker, name=sub_name, root=root, depth=depth + 1)

    if isinstance(schema.get("$ref"), str):
        return inner(_resolve_ref(root, schema["$ref"]))
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][picker.below(len(schema["enum"]))]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return inner(schema[key][0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        given_props, given_keys = schema.get("properties"), schema.get("required")
        props: dict[str, Any] = given_props if isinstance(given_props, dict) else {}
        keys: list[Any] = given_keys if isinstance(given_keys, list) else list(props)
        return {str(k): inner(props.get(k, {}), str(k)) for k in keys}
    if kind == "array":
        count = max(1, min(int(schema.get("minItems") or 1), 3))
        return [inner(schema.get("items", {})) for _ in range(count)]
    return _scalar(kind, schema, picker, name)


def _scalar(kind: Any, schema: dict[str, Any], picker: Picker, name: str) -> Any:
    if kind in ("integer", "number"):
        low = math.ceil(schema.get("minimum", 0))
        high = math.floor(schema.get("maximum", low + 99))
        value = low + picker.below(max(high - low, 0) + 1)
        return value if kind == "integer" else float(value)
    if kind == "boolean":
        return picker.below(2) == 1
    if kind == "null":
        return None
    return f"mock-{name}"


def _resolve_ref(root: Any, ref: str) -> Any:
    """Local references only (`#/$defs/Name`); a remote one resolves to nothing."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref.removeprefix("#").strip("/").split("/"):
        if part:
            node = node.get(part) if isinstance(node, dict) else None
    return node


def offered_function(body: dict[str, Any]) -> FunctionSpec | None:
    """The function the mock calls, or None: no tools, `none` chosen, or a tool result to read."""
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") in ("tool", "function"):
        return None
    tools = [
        t["function"]
        for t in body.get("tools") or []
        if isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
    ]
    if tools:
        choice = body.get("tool_choice")
        wanted = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        return _pick(tools, choice, wanted, legacy=False)
    functions = [f for f in body.get("functions") or [] if isinstance(f, dict)]
    if functions:
        choice = body.get("function_call")
        wanted = choice.get("name") if isinstance(choice, dict) else None
        return _pick(functions, choice, wanted, legacy=True)
    return None


def _pick(
    functions: list[dict[str, Any]], choice: Any, wanted: Any, *, legacy: bool
) -> FunctionSpec | None:
    if choice == "none":
        return None
    chosen = next((f for f in functions if f.get("name") == wanted), functions[0])
    params = chosen.get("parameters")
    parameters = params if isinstance(params, dict) else {}
    return FunctionSpec(str(chosen.get("name", "")), parameters, legacy)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _chat_text(body: dict[str, Any], picker: Picker, encoding: str) -> str:
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema" and isinstance(fmt, dict):
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            schema = {"type": "object"}
        return _dumps(fill_schema(schema, picker))
    if kind == "json_object":
        return _dumps({"answer": prose("", picker, encoding), "mock": True})
    return prose(_lead(body["messages"], encoding), picker, encoding)


def _tool_choice(
    index: int, fn: FunctionSpec, limit: int | None, encoding: str, picker: Picker
) -> Choice:
    # Functions without parameters still take an (empty) arguments object.
    arguments = _dumps(fill_schema(fn.parameters or {"type": "object"}, picker))
    name_tokens = count_text(fn.name, encoding)
    room = None if limit is None else max(limit - name_tokens, 0)
    kept, tokens, cut = truncate_tokens(arguments, encoding, room)
    call = ToolCall("call_" + picker.hex(24), fn.name, kept, fn.legacy)
    finish = "length" if cut else "function_call" if fn.legacy else "tool_calls"
    return Choice(index, None, call, finish, name_tokens + tokens)


def chat_choices(body: dict[str, Any], encoding: str) -> list[Choice]:
    seed, limit, fn = content_seed(body), token_limit(body), offered_function(body)
    choices: list[Choice] = []
    for index in range(choice_count(body)):
        picker = Picker(seed, index)
        if fn is not None:
            choices.append(_tool_choice(index, fn, limit, encoding, picker))
            continue
        text, tokens, cut = truncate_tokens(_chat_text(body, picker, encoding), encoding, limit)
        choices.append(Choice(index, text, None, "length" if cut else "stop", tokens))
    return choices


def prompt_list(prompt: Any, *, param: str) -> list[str | list[int]]:
    """A completions `prompt` or embeddings `input` as a list of texts or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(_is_text_or_ids(p) for p in prompt):
        return [p if isinstance(p, str) else list(p) for p in prompt]
    message = f"{param} must be a string, a list of strings or a list of token ids"
    raise InvalidRequest(message, param=param)


def _is_text_or_ids(item: Any) -> bool:
    if isinstance(item, str):
        return True
    return isinstance(item, list) and all(isinstance(t, int) for t in item)


def completion_choices(body: dict[str, Any], encoding: str) -> list[Choice]:
    """`n` choices per prompt, indexed prompt-major as OpenAI does."""
    seed, limit, n = content_seed(body), token_limit(body), choice_count(body)
    choices: list[Choice] = []
    for p, prompt in enumerate(prompt_list(body.get("prompt"), param="prompt")):
        # Continue the prompt's sentence with a space unless it already ends in whitespace.
        lead = "" if isinstance(prompt, str) and (not prompt or prompt[-1].isspace()) else " "
        for i in range(n):
            index = p * n + i
            text = prose(lead, Picker(seed, index), encoding)
            kept, tokens, cut = truncate_tokens(text, encoding, limit)
            choices.append(Choice(index, kept, None, "length" if cut else "stop", tokens))
    return choices


def embedding_vector(model: str, item: str | Sequence[int], dimensions: int) -> list[float]:
    """A unit vector from SHAKE-256 over the input's SHA-256, rounded to float32.

    Float32 values make the `float` and `base64` encodings carry exactly the same numbers,
    and a smaller `dimensions` gives a prefix of the larger vector, renormalised.
    """
    digest = hashlib.sha256(orjson.dumps([model, item])).digest()
    words = struct.unpack(f"<{dimensions}I", hashlib.shake_256(digest).digest(4 * dimensions))
    values = [w / 2**31 - 1.0 for w in words]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))
