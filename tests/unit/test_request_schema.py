"""Request shapes per endpoint: each documented rule refuses a broken body with a 400 naming
the field's path, and accepts what the OpenAI API documents."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.pipeline.request_schema import INT64_MAX, INT64_MIN, check_shape
from gateway.providers.base import Endpoint

CHAT, COMPLETIONS, EMBEDDINGS = Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS
HELLO = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HELLO, **fields}


def refused(endpoint: Endpoint, body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        check_shape(endpoint, body)
    assert caught.value.status == 400 and caught.value.type == "invalid_request_error"
    return caught.value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": {"role": "user", "content": "hi"}}, "messages"),
        ({"messages": [1, 2]}, "messages[0]"),
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "root", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [*HELLO, {"role": "User", "content": "hi"}]}, "messages[1].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages[0].content[0].image_url"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]}]}, "messages[0].content[0].image_url.detail"),
        ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "hi", "name": 7}]}, "messages[0].name"),
        ({"messages": [{"role": "assistant"}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]}, "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "function", "content": "42"}]}, "messages[0].name"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop": ["a", 3]}, "stop"),
        ({"seed": INT64_MAX + 1}, "seed"),
        ({"seed": INT64_MIN - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"logit_bias": {"50256": 101}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream_options": 1}, "stream_options"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
        ({"functions": [{"name": "f", "description": 3}]}, "functions[0].description"),
        ({"parallel_tool_calls": "true"}, "parallel_tool_calls"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"modalities": "text"}, "modalities"),
        ({"user": 42}, "user"),
    ],
)  # fmt: skip
def test_chat_bodies_outside_the_schema_are_refused_naming_the_field(fields: dict[str, Any], param: str) -> None:
    assert refused(CHAT, chat(**fields)).param == param


def test_a_missing_required_field_is_named() -> None:
    error = refused(CHAT, {"model": "m"})
    assert error.param == "messages" and error.code == "missing_required_parameter"
    assert refused(COMPLETIONS, {"model": "m"}).param == "prompt"
    assert refused(EMBEDDINGS, {"model": "m", "input": None}).param == "input"


def test_errors_say_how_the_field_is_wrong() -> None:
    assert refused(CHAT, chat(messages=[])).code == "empty_array"
    assert refused(CHAT, chat(temperature="1")).code == "invalid_type"
    assert refused(CHAT, chat(temperature=3)).code == "invalid_value"
    assert refused(CHAT, chat(temperature=3)).extra == {"rule": "invalid_param"}
    error = refused(CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "strict": 1}}]))
    assert error.extra == {"rule": "invalid_tools"}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"temperature": 0, "top_p": 1, "presence_penalty": -2, "frequency_penalty": 2.0},
        {"temperature": None, "stop": None, "seed": None, "n": None},  # null: the default
        {"seed": INT64_MIN, "stop": "\n", "n": 128, "max_tokens": 1, "max_completion_tokens": 9},
        {"seed": INT64_MAX, "stop": ["a", "b", "c", "d"], "logprobs": True, "top_logprobs": 20},
        {"stop": []},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": True}}},
        {"response_format": {"type": "json_object"}},
        {"logit_bias": {"50256": -100, "1": 2.5}},
        {"metadata": {"k": "v"}, "modalities": ["text"], "user": "u", "store": False},
        {"messages": [
            {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "system", "content": "be kind", "name": "sys"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-1"}},
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "refusal": "no"},
            {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "name": "f", "content": None},
            {"role": "user", "content": "thanks", "api_base": "ignored here: the PEP's business"},
        ]},
    ],
)  # fmt: skip
def test_documented_chat_bodies_pass(fields: dict[str, Any]) -> None:
    check_shape(CHAT, chat(**fields))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": "x", "best_of": 21}, "best_of"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "echo": 1}, "echo"),
        ({"prompt": "x", "suffix": 1}, "suffix"),
        ({"prompt": "x", "stop": ["a"] * 5}, "stop"),
    ],
)
def test_completion_bodies_outside_the_schema_are_refused(body: dict[str, Any], param: str) -> None:
    assert refused(COMPLETIONS, {"model": "m", **body}).param == param


@pytest.mark.parametrize("prompt", ["", "x", ["a", "b"], [1, 2, 3], [[1], [2, 3]]])
def test_documented_prompts_pass(prompt: Any) -> None:
    check_shape(COMPLETIONS, {"model": "m", "prompt": prompt, "logprobs": 0, "echo": True})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": [["a"]]}, "input"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_embedding_bodies_outside_the_schema_are_refused(body: dict[str, Any], param: str) -> None:
    assert refused(EMBEDDINGS, {"model": "m", **body}).param == param


@pytest.mark.parametrize("value", ["x", ["a", "b"], [1, 2], [[1, 2], [3]]])
def test_documented_embedding_inputs_pass(value: Any) -> None:
    check_shape(EMBEDDINGS, {"model": "m", "input": value, "encoding_format": "base64", "dimensions": 8})
