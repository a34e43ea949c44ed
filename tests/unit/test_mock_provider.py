"""The built-in `mock` provider: deterministic, OpenAI-shaped, token-exact, and its fault models."""

from __future__ import annotations

import array
import asyncio
import base64
import math
import time
from typing import Any

import httpx2
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from gateway.providers.base import Endpoint, Provider
from gateway.providers.mock import (
    CUT_MESSAGE,
    ERROR_MESSAGE,
    FAULT_KEYWORDS,
    MockProvider,
    answer_text,
)
from gateway.providers.mock_content import text_pieces
from gateway.settings import ProviderSettings, TimeoutSettings
from gateway.tokenizer import count_chat_prompt, count_text

SLOW_S = 0.05
ORDER_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order by id",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string"},
                "quantity": {"type": "integer"},
                "express": {"type": "boolean"},
                "note": {"type": "string"},
            },
            "required": ["order_id", "quantity", "express"],
        },
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}


def make_provider(**kwargs: Any) -> MockProvider:
    return MockProvider(ProviderSettings(name="mock", kind="mock"), slow_delay_s=SLOW_S, **kwargs)


@pytest.fixture
def provider() -> MockProvider:
    return make_provider()


def chat(text: str = "What is the status of order 42?", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-small", "messages": [{"role": "user", "content": text}], **extra}


async def collect(provider: MockProvider, endpoint: Endpoint, body: dict[str, Any]) -> list[bytes]:
    return [chunk async for chunk in provider.stream(endpoint, body)]


async def reply(provider: MockProvider, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
    return (await provider.send(endpoint, body)).data


def parsed(chunks: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(c) for c in chunks]


def streamed_content(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
    )


def test_mock_provider_satisfies_the_provider_protocol(provider: MockProvider) -> None:
    typed: Provider = provider
    assert typed.name == "mock"


# Determinism


async def test_same_request_gives_byte_identical_replies_across_instances() -> None:
    a, b = make_provider(), make_provider()
    for endpoint, body in [
        (Endpoint.CHAT, chat()),
        (Endpoint.CHAT, chat(tools=[ORDER_TOOL])),
        (Endpoint.COMPLETIONS, {"model": "mock", "prompt": "Once upon a time"}),
        (Endpoint.EMBEDDINGS, {"model": "mock-embed", "input": ["a", "b"]}),
    ]:
        first = await a.send(endpoint, body)
        assert first.body == (await a.send(endpoint, body)).body
        assert first.body == (await b.send(endpoint, body)).body
        assert first.data == orjson.loads(first.body)


async def test_same_stream_gives_byte_identical_chunks_across_instances() -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    assert await collect(make_provider(), Endpoint.CHAT, body) == await collect(
        make_provider(), Endpoint.CHAT, body
    )


async def test_ids_and_created_come_from_the_request_not_the_clock(provider: MockProvider) -> None:
    data = (await provider.send(Endpoint.CHAT, chat())).data
    assert data["id"].startswith("chatcmpl-mock-")
    assert len(data["id"]) == len("chatcmpl-mock-") + 24
    other = (await provider.send(Endpoint.CHAT, chat("Something else entirely"))).data
    assert other["id"] != data["id"]
    assert isinstance(data["created"], int)


async def test_different_requests_get_different_answers(provider: MockProvider) -> None:
    answers = {answer_text(chat(f"question number {i}")) for i in range(20)}
    assert len(answers) == 20
    systems = [
        {"model": "mock", "messages": [{"role": "system", "content": f"s{i}"}]} for i in range(20)
    ]
    assert len({answer_text(body) for body in systems}) == 20


def test_answers_are_readable_and_20_to_60_tokens() -> None:
    for i in range(60):
        text = answer_text(chat(f"Tell me about topic {i} " * (i % 7)))
        assert 20 <= count_text(text, "o200k_base") <= 60, text
        assert text.endswith(".")


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200), limit=st.integers(min_value=0, max_value=80))
def test_any_user_text_gives_a_truncatable_streamable_answer(text: str, limit: int) -> None:
    full = answer_text(chat(text))
    truncated = answer_text(chat(text, max_tokens=limit))
    assert full.startswith(truncated)
    assert "".join(text_pieces(full, "o200k_base")) == full


def test_answer_echoes_the_last_user_message() -> None:
    assert answer_text(chat("Where is my parcel?")).startswith('You said: "Where is my parcel?".')


# Shapes the official SDK accepts


async def test_chat_completion_validates_with_the_openai_sdk(provider: MockProvider) -> None:
    data = (await provider.send(Endpoint.CHAT, chat())).data
    completion = ChatCompletion.model_validate(data)
    assert completion.object == "chat.completion"
    assert completion.model == "mock-small"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.system_fingerprint


async def test_chat_chunks_validate_with_the_openai_sdk(provider: MockProvider) -> None:
    for body in (chat(), chat(tools=[ORDER_TOOL]), chat(functions=[ORDER_TOOL["function"]])):
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        for chunk in parsed(await collect(provider, Endpoint.CHAT, body)):
            assert ChatCompletionChunk.model_validate(chunk).object == "chat.completion.chunk"


async def test_completions_validate_with_the_openai_sdk(provider: MockProvider) -> None:
    body = {"model": "mock", "prompt": "Once upon", "stream_options": {"include_usage": True}}
    assert Completion.model_validate((await provider.send(Endpoint.COMPLETIONS, body)).data)
    for chunk in parsed(await collect(provider, Endpoint.COMPLETIONS, body)):
        # OpenAI streams `finish_reason: null` until the end, which the SDK's (unvalidated)
        # chunk parsing accepts but the strict Completion model does not.
        for choice in chunk["choices"]:
            choice["finish_reason"] = choice["finish_reason"] or "stop"
        assert Completion.model_validate(chunk).object == "text_completion"


async def test_embeddings_validate_with_the_openai_sdk(provider: MockProvider) -> None:
    data = await reply(provider, Endpoint.EMBEDDINGS, {"model": "mock-embed", "input": "hello"})
    response = CreateEmbeddingResponse.model_validate(data)
    assert len(response.data[0].embedding) == 1536


# Streaming


async def test_streamed_chat_joins_to_answer_text_and_the_content(provider: MockProvider) -> None:
    body = chat()
    plain = (await provider.send(Endpoint.CHAT, body)).data["choices"][0]["message"]["content"]
    chunks = parsed(await collect(provider, Endpoint.CHAT, {**body, "stream": True}))
    assert streamed_content(chunks) == answer_text(body) == plain


async def test_stream_opens_with_role_and_closes_with_finish_reason(provider: MockProvider) -> None:
    chunks = parsed(await collect(provider, Endpoint.CHAT, chat(stream=True)))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    closing = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[-1]["choices"][0] == closing
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_stream_sends_about_one_chunk_per_token(provider: MockProvider) -> None:
    body = chat()
    tokens = count_text(answer_text(body), "o200k_base")
    content_chunks = len(parsed(await collect(provider, Endpoint.CHAT, body))) - 2
    assert tokens - 2 <= content_chunks <= tokens


async def test_include_usage_adds_a_usage_chunk_only_when_asked(provider: MockProvider) -> None:
    without = parsed(await collect(provider, Endpoint.CHAT, chat(stream=True)))
    assert all("usage" not in c for c in without)

    body = chat(stream=True, stream_options={"include_usage": True})
    with_usage = parsed(await collect(provider, Endpoint.CHAT, body))
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert with_usage[-1]["choices"] == []
    assert with_usage[-1]["usage"] == (await provider.send(Endpoint.CHAT, chat())).data["usage"]
    assert len(with_usage) == len(without) + 1


async def test_streamed_completion_joins_to_the_plain_text(provider: MockProvider) -> None:
    body = {"model": "mock", "prompt": "The gateway", "n": 2}
    plain = (await provider.send(Endpoint.COMPLETIONS, body)).data["choices"]
    chunks = parsed(await collect(provider, Endpoint.COMPLETIONS, body))
    for index in (0, 1):
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == index)
        assert text == plain[index]["text"] == answer_text(body, index=index)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_closing_a_stream_early_is_clean(provider: MockProvider) -> None:
    stream = provider.stream(Endpoint.CHAT, chat())
    assert await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]


# Token counts


async def test_usage_matches_tiktoken_counts(provider: MockProvider) -> None:
    body = chat()
    data = (await provider.send(Endpoint.CHAT, body)).data
    content = data["choices"][0]["message"]["content"]
    assert data["usage"]["prompt_tokens"] == count_chat_prompt(body["messages"], "o200k_base")
    assert data["usage"]["completion_tokens"] == count_text(content, "o200k_base")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_known_model_names_count_with_their_own_encoding(provider: MockProvider) -> None:
    body = {**chat(), "model": "gpt-3.5-turbo"}
    data = (await provider.send(Endpoint.CHAT, body)).data
    content = data["choices"][0]["message"]["content"]
    assert data["usage"]["prompt_tokens"] == count_chat_prompt(body["messages"], "cl100k_base")
    assert data["usage"]["completion_tokens"] == count_text(content, "cl100k_base")


async def test_offered_tools_count_as_prompt_tokens(provider: MockProvider) -> None:
    body = chat(tools=[ORDER_TOOL])
    usage = (await provider.send(Endpoint.CHAT, body)).data["usage"]
    tools_tokens = count_text(orjson.dumps([ORDER_TOOL]).decode(), "o200k_base")
    messages_tokens = count_chat_prompt(body["messages"], "o200k_base")
    assert usage["prompt_tokens"] == messages_tokens + tools_tokens


async def test_completion_usage_counts_every_prompt(provider: MockProvider) -> None:
    body = {"model": "mock", "prompt": ["first prompt", [1, 2, 3]]}
    data = (await provider.send(Endpoint.COMPLETIONS, body)).data
    assert data["usage"]["prompt_tokens"] == count_text("first prompt", "o200k_base") + 3
    texts = [c["text"] for c in data["choices"]]
    assert data["usage"]["completion_tokens"] == sum(count_text(t, "o200k_base") for t in texts)


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
async def test_token_limit_truncates_with_finish_reason_length(
    provider: MockProvider, key: str
) -> None:
    full = answer_text(chat())
    data = (await provider.send(Endpoint.CHAT, chat(**{key: 7}))).data
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 7
    assert full.startswith(choice["message"]["content"])
    assert count_text(choice["message"]["content"], "o200k_base") == 7


async def test_a_generous_token_limit_changes_nothing_but_the_id(provider: MockProvider) -> None:
    data = (await provider.send(Endpoint.CHAT, chat(max_tokens=500))).data
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["choices"][0]["message"]["content"] == answer_text(chat())


async def test_truncated_stream_matches_the_truncated_answer(provider: MockProvider) -> None:
    body = chat(max_tokens=5, stream_options={"include_usage": True})
    chunks = parsed(await collect(provider, Endpoint.CHAT, body))
    assert streamed_content(chunks) == answer_text(body)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


# Choices and formats


async def test_n_gives_n_distinct_deterministic_choices(provider: MockProvider) -> None:
    data = (await provider.send(Endpoint.CHAT, chat(n=3))).data
    contents = [c["message"]["content"] for c in data["choices"]]
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert len(set(contents)) == 3
    assert contents[0] == answer_text(chat())
    assert data["usage"]["completion_tokens"] == sum(count_text(c, "o200k_base") for c in contents)
    chunks = parsed(await collect(provider, Endpoint.CHAT, chat(n=3)))
    assert [streamed_content(chunks, i) for i in range(3)] == contents


async def test_json_object_format_answers_valid_json(provider: MockProvider) -> None:
    body = chat(response_format={"type": "json_object"})
    content = (await provider.send(Endpoint.CHAT, body)).data["choices"][0]["message"]["content"]
    assert isinstance(orjson.loads(content), dict)


async def test_json_schema_format_fills_required_properties_with_their_types(
    provider: MockProvider,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 18, "maximum": 30},
            "score": {"type": "number"},
            "active": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "address": {"$ref": "#/$defs/Address"},
            "nickname": {"type": ["string", "null"]},
        },
        "required": ["name", "age", "score", "active", "tags", "address"],
        "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
    spec = {"name": "person", "schema": schema, "strict": True}
    fmt = {"type": "json_schema", "json_schema": spec}
    content = (await provider.send(Endpoint.CHAT, chat(response_format=fmt))).data["choices"][0]
    value = orjson.loads(content["message"]["content"])
    assert set(value) == {"name", "age", "score", "active", "tags", "address"}
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int) and 18 <= value["age"] <= 30
    assert isinstance(value["score"], float)
    assert isinstance(value["active"], bool)
    assert value["tags"] and all(isinstance(t, str) for t in value["tags"])
    assert isinstance(value["address"]["city"], str)


# Tools


async def test_offered_tools_get_a_call_with_required_arguments(provider: MockProvider) -> None:
    data = (await provider.send(Endpoint.CHAT, chat(tools=[ORDER_TOOL, WEATHER_TOOL]))).data
    choice = ChatCompletion.model_validate(data).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.type == "function" and call.function.name == "lookup_order"
    arguments = orjson.loads(call.function.arguments)
    assert {"order_id", "quantity", "express"} <= set(arguments)
    assert isinstance(arguments["order_id"], str)
    assert isinstance(arguments["quantity"], int) and not isinstance(arguments["quantity"], bool)
    assert isinstance(arguments["express"], bool)
    name_tokens = count_text("lookup_order", "o200k_base")
    arguments_tokens = count_text(call.function.arguments, "o200k_base")
    assert data["usage"]["completion_tokens"] == name_tokens + arguments_tokens


async def test_tool_choice_forces_the_named_function(provider: MockProvider) -> None:
    forced = {"type": "function", "function": {"name": "get_weather"}}
    body = chat(tools=[ORDER_TOOL, WEATHER_TOOL], tool_choice=forced)
    data = await reply(provider, Endpoint.CHAT, body)
    call = data["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"])["unit"] in ("c", "f")


async def test_tool_choice_none_answers_with_text(provider: MockProvider) -> None:
    body = chat(tools=[ORDER_TOOL], tool_choice="none")
    choice = (await provider.send(Endpoint.CHAT, body)).data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == answer_text(body) != ""
    assert "tool_calls" not in choice["message"]


async def test_a_tool_result_is_answered_with_text_that_mentions_it(provider: MockProvider) -> None:
    first = await reply(provider, Endpoint.CHAT, chat(tools=[ORDER_TOOL]))
    call = first["choices"][0]["message"]["tool_calls"][0]
    body = chat(tools=[ORDER_TOOL])
    body["messages"] += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "order 42 shipped on Monday"},
    ]
    choice = (await provider.send(Endpoint.CHAT, body)).data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "order 42 shipped on Monday" in choice["message"]["content"]


async def test_legacy_functions_get_a_function_call(provider: MockProvider) -> None:
    body = chat(functions=[WEATHER_TOOL["function"]], function_call={"name": "get_weather"})
    data = (await provider.send(Endpoint.CHAT, body)).data
    choice = ChatCompletion.model_validate(data).choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call is not None
    assert choice.message.function_call.name == "get_weather"
    assert set(orjson.loads(choice.message.function_call.arguments)) == {"city", "unit"}


async def test_streamed_tool_call_matches_the_plain_call(provider: MockProvider) -> None:
    body = chat(tools=[ORDER_TOOL])
    plain = (await reply(provider, Endpoint.CHAT, body))["choices"][0]["message"]["tool_calls"][0]
    chunks = parsed(await collect(provider, Endpoint.CHAT, body))
    opener = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert opener == {
        "index": 0,
        "id": plain["id"],
        "type": "function",
        "function": {"name": "lookup_order", "arguments": ""},
    }
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas]
    assert len(fragments) > 3
    assert "".join(fragments) == plain["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_streamed_legacy_function_call(provider: MockProvider) -> None:
    body = chat(functions=[ORDER_TOOL["function"]])
    chunks = parsed(await collect(provider, Endpoint.CHAT, body))
    opener = chunks[0]["choices"][0]["delta"]["function_call"]
    assert opener == {"name": "lookup_order", "arguments": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    arguments = "".join(d["function_call"]["arguments"] for d in deltas)
    assert set(orjson.loads(arguments)) >= {"order_id", "quantity", "express"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


async def test_tool_call_respects_the_token_limit(provider: MockProvider) -> None:
    data = (await provider.send(Endpoint.CHAT, chat(tools=[ORDER_TOOL], max_tokens=6))).data
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] <= 6


# Embeddings


async def test_embeddings_are_unit_vectors_of_the_requested_size(provider: MockProvider) -> None:
    body = {"model": "mock-embed", "input": ["alpha", "beta"], "dimensions": 64}
    data = (await provider.send(Endpoint.EMBEDDINGS, body)).data
    vectors = [d["embedding"] for d in data["data"]]
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert all(len(v) == 64 for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, abs_tol=1e-5) for v in vectors)
    assert vectors[0] != vectors[1]
    tokens = count_text("alpha", "o200k_base") + count_text("beta", "o200k_base")
    assert data["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


async def test_base64_embeddings_decode_to_the_float_embeddings(provider: MockProvider) -> None:
    body = {"model": "mock-embed", "input": "hello"}
    floats = (await provider.send(Endpoint.EMBEDDINGS, body)).data["data"][0]["embedding"]
    encoded = (await provider.send(Endpoint.EMBEDDINGS, {**body, "encoding_format": "base64"})).data
    decoded = array.array("f", base64.b64decode(encoded["data"][0]["embedding"])).tolist()
    assert decoded == floats


async def test_token_id_inputs_embed_and_count_one_token_per_id(provider: MockProvider) -> None:
    body = {"model": "mock-embed", "input": [[1, 2, 3], [4, 5]]}
    data = (await provider.send(Endpoint.EMBEDDINGS, body)).data
    assert len(data["data"]) == 2
    assert data["usage"]["prompt_tokens"] == 5


async def test_embeddings_cannot_stream(provider: MockProvider) -> None:
    with pytest.raises(InvalidRequest):
        await collect(provider, Endpoint.EMBEDDINGS, {"model": "mock", "input": "x"})


# Through the official SDK, in process (no sockets)


def sdk_client(provider: MockProvider) -> AsyncOpenAI:
    endpoints = {"/v1/chat/completions": Endpoint.CHAT, "/v1/embeddings": Endpoint.EMBEDDINGS}

    async def handle(request: httpx2.Request) -> httpx2.Response:
        endpoint, body = endpoints[request.url.path], orjson.loads(request.content)
        if not body.get("stream"):
            return httpx2.Response(200, content=(await provider.send(endpoint, body)).body)
        events = [b"data: " + chunk + b"\n\n" async for chunk in provider.stream(endpoint, body)]
        sse = b"".join(events) + b"data: [DONE]\n\n"
        return httpx2.Response(200, content=sse, headers={"content-type": "text/event-stream"})

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(handle))
    return AsyncOpenAI(api_key="unused", base_url="http://mock.test/v1", http_client=http)


async def test_the_openai_sdk_reads_plain_and_streamed_chat(provider: MockProvider) -> None:
    client = sdk_client(provider)
    messages: Any = chat()["messages"]
    plain = await client.chat.completions.create(model="mock-small", messages=messages)
    stream = await client.chat.completions.create(
        model="mock-small", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage = [], None
    async for chunk in stream:
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == plain.choices[0].message.content == answer_text(chat())
    assert usage == plain.usage


async def test_the_openai_sdk_decodes_base64_embeddings(provider: MockProvider) -> None:
    client = sdk_client(provider)
    # The SDK asks for base64 by default and decodes it; the floats must equal the float format.
    decoded = await client.embeddings.create(model="mock-embed", input="hello")
    floats = await client.embeddings.create(
        model="mock-embed", input="hello", encoding_format="float"
    )
    assert decoded.data[0].embedding == floats.data[0].embedding
    assert len(decoded.data[0].embedding) == 1536


# Bad requests


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (Endpoint.CHAT, {"model": "mock"}),
        (Endpoint.CHAT, chat(n=0)),
        (Endpoint.CHAT, chat(max_tokens="ten")),
        (Endpoint.COMPLETIONS, {"model": "mock", "prompt": 3}),
        (Endpoint.EMBEDDINGS, {"model": "mock", "input": "x", "dimensions": 0}),
        (Endpoint.EMBEDDINGS, {"model": "mock", "input": "x", "encoding_format": "hex"}),
    ],
)
async def test_malformed_requests_are_invalid(
    provider: MockProvider, endpoint: Endpoint, body: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequest):
        await provider.send(endpoint, body)


# Fault models


def test_fault_keywords_are_the_documented_ones() -> None:
    assert FAULT_KEYWORDS == ("slow", "error", "cut", "nousage")


async def test_slow_model_waits_before_answering(provider: MockProvider) -> None:
    started = time.perf_counter()
    await provider.send(Endpoint.CHAT, {**chat(), "model": "mock-SLOW"})
    assert time.perf_counter() - started >= SLOW_S

    started = time.perf_counter()
    stream = provider.stream(Endpoint.CHAT, {**chat(), "model": "mock-slow"})
    await anext(stream)
    assert time.perf_counter() - started >= SLOW_S
    await stream.aclose()  # type: ignore[attr-defined]


async def test_slow_model_beyond_the_provider_timeout_times_out() -> None:
    settings = ProviderSettings(name="mock", kind="mock", timeouts=TimeoutSettings(first_byte_s=0.01))
    provider = MockProvider(settings, slow_delay_s=5.0)
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(provider.send(Endpoint.CHAT, {**chat(), "model": "mock-slow"}), 1.0)


async def test_error_model_fails_send_and_stream_start(provider: MockProvider) -> None:
    body = {**chat(), "model": "mock-error"}
    with pytest.raises(UpstreamError) as raised:
        await provider.send(Endpoint.CHAT, body)
    assert raised.value.status == 502 and raised.value.message == ERROR_MESSAGE
    stream = provider.stream(Endpoint.CHAT, body)
    with pytest.raises(UpstreamError):
        await anext(stream)


async def test_cut_model_stops_a_stream_halfway(provider: MockProvider) -> None:
    body = {**chat(), "model": "mock-cut"}
    whole = len(text_pieces(answer_text(body), "o200k_base")) + 2  # and the opening, closing chunks
    received: list[bytes] = []
    with pytest.raises(UpstreamError) as raised:
        async for chunk in provider.stream(Endpoint.CHAT, body):
            received.append(chunk)
    assert raised.value.message == CUT_MESSAGE
    assert received and abs(len(received) - whole / 2) <= 1
    assert answer_text(body).startswith(streamed_content(parsed(received)))
    with pytest.raises(UpstreamError):
        await provider.send(Endpoint.CHAT, {**chat(), "model": "mock-cut"})


async def test_nousage_model_never_streams_usage(provider: MockProvider) -> None:
    body = chat(model="mock-nousage", stream_options={"include_usage": True})
    chunks = parsed(await collect(provider, Endpoint.CHAT, body))
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" in (await provider.send(Endpoint.CHAT, body)).data


async def test_close_is_harmless(provider: MockProvider) -> None:
    await provider.close()
    await provider.close()
