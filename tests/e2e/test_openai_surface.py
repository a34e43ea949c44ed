"""The OpenAI surface through a real gateway, with the official SDK, sync and async:
chat (plain, streamed, tools, JSON mode, n), completions, embeddings, models, health."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.conftest import OPEN_PLAN, Gateway
from tests.openai_support import async_sdk, bearer, sdk, sse_events

HELLO = [{"role": "user", "content": "hello there"}]
LOOKUP_ORDER = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order by id",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}



@pytest.fixture
def client(gw: Gateway) -> openai.OpenAI:
    return sdk(gw, gw.token(OPEN_PLAN))


@pytest.fixture
def aclient(gw: Gateway) -> openai.AsyncOpenAI:
    return async_sdk(gw, gw.token(OPEN_PLAN))


def _assert_chunks_parse(chunks: list[ChatCompletionChunk]) -> None:
    # The SDK builds chunks without validation; validating their data proves the shape.
    for chunk in chunks:
        assert isinstance(chunk, ChatCompletionChunk)
        ChatCompletionChunk.model_validate(chunk.to_dict())
        assert chunk.object == "chat.completion.chunk"


def _streamed_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _tool_result_messages(completion: ChatCompletion) -> list[dict[str, Any]]:
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    return [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
    ]


def _assert_tool_call(completion: ChatCompletion) -> None:
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function" and calls[0].function.name == "lookup_order"
    assert "order_id" in json.loads(calls[0].function.arguments)


# --- sync SDK -------------------------------------------------------------------------------


def test_chat_completion_answers_with_usage_and_cost_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
    completion = raw.parse()
    assert isinstance(completion, ChatCompletion)
    ChatCompletion.model_validate(completion.to_dict())
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers["x-request-id"]
    assert raw.headers["x-abc-session"].startswith("sess_")
    assert float(raw.headers["x-abc-cost-usd"]) > 0
    assert float(raw.headers["x-abc-budget-remaining-usd"]) < 10.0


def test_chat_stream_chunks_parse_and_end_with_usage_when_asked(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    _assert_chunks_parse(chunks)
    assert all(c.choices for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert _streamed_text(chunks) == plain.choices[0].message.content


def test_chat_stream_has_no_usage_chunk_unless_asked(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    _assert_chunks_parse(chunks)
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_call_round_trips(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, tools=[LOOKUP_ORDER]
    )
    _assert_tool_call(first)
    second = client.chat.completions.create(
        model="gpt-4o-mini", messages=_tool_result_messages(first), tools=[LOOKUP_ORDER]
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    assert "shipped" in (second.choices[0].message.content or "")


def test_streamed_tool_call_reassembles(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, tools=[LOOKUP_ORDER], stream=True
        )
    )
    _assert_chunks_parse(chunks)
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function is not None and deltas[0].function.name == "lookup_order"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert "order_id" in json.loads(arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_object_response_format_gives_a_json_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_n_two_gives_two_choices(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.message.content for c in completion.choices)


def test_completions_plain_and_streamed_say_the_same(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert isinstance(plain, Completion) and plain.choices[0].text
    assert plain.usage is not None and plain.usage.prompt_tokens > 0
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="Say hi",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # Not validated as `Completion`: its type says finish_reason is never null, which is
    # false of every chunk but the last on OpenAI's own streams too.
    assert all(isinstance(c, Completion) and c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage is not None


def test_embeddings_base64_default_decodes_to_the_float_vectors(client: openai.OpenAI) -> None:
    texts = ["the first text", "the second text"]
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=texts, encoding_format="float"
    )
    default = client.embeddings.create(model="text-embedding-3-small", input=texts)  # base64
    assert isinstance(default, CreateEmbeddingResponse)
    assert [d.index for d in floats.data] == [0, 1]
    assert len(floats.data[0].embedding) == 1536
    assert floats.data[0].embedding != floats.data[1].embedding
    for f, b in zip(floats.data, default.data, strict=True):
        assert b.embedding == pytest.approx(f.embedding, rel=1e-6, abs=1e-7)
    assert floats.usage.prompt_tokens > 0


def test_models_lists_the_plan_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {m["name"] for m in OPEN_PLAN["models"]}


# --- async SDK ------------------------------------------------------------------------------


async def test_async_chat_completion(aclient: openai.AsyncOpenAI) -> None:
    completion = await aclient.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0


async def test_async_chat_stream_with_and_without_usage(aclient: openai.AsyncOpenAI) -> None:
    with_usage = [
        c
        async for c in await aclient.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    ]
    _assert_chunks_parse(with_usage)
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    without = [
        c
        async for c in await aclient.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True
        )
    ]
    _assert_chunks_parse(without)
    assert all(c.usage is None and c.choices for c in without)
    assert _streamed_text(without) == _streamed_text(with_usage)


async def test_async_tool_call_round_trips(aclient: openai.AsyncOpenAI) -> None:
    first = await aclient.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, tools=[LOOKUP_ORDER]
    )
    _assert_tool_call(first)
    second = await aclient.chat.completions.create(
        model="gpt-4o-mini", messages=_tool_result_messages(first), tools=[LOOKUP_ORDER]
    )
    assert "shipped" in (second.choices[0].message.content or "")


async def test_async_json_object_and_n(aclient: openai.AsyncOpenAI) -> None:
    completion = await aclient.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, response_format={"type": "json_object"}, n=2
    )
    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert isinstance(json.loads(choice.message.content or ""), dict)


async def test_async_completions_plain_and_streamed(aclient: openai.AsyncOpenAI) -> None:
    plain = await aclient.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    stream = await aclient.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert all(c.usage is None for c in chunks)


async def test_async_embeddings_float_and_base64(aclient: openai.AsyncOpenAI) -> None:
    floats = await aclient.embeddings.create(
        model="text-embedding-3-small", input="one text", encoding_format="float", dimensions=64
    )
    default = await aclient.embeddings.create(
        model="text-embedding-3-small", input="one text", dimensions=64
    )
    assert len(floats.data[0].embedding) == 64
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6, abs=1e-7)


async def test_async_models(aclient: openai.AsyncOpenAI) -> None:
    page = await aclient.models.list()
    assert {m.id for m in page.data} == {m["name"] for m in OPEN_PLAN["models"]}


# --- raw HTTP -------------------------------------------------------------------------------


def test_raw_stream_is_sse_ending_with_done_and_every_event_validates(gw: Gateway) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST",
        gw.openai_base + "/chat/completions",
        json=body,
        headers=bearer(gw.token(OPEN_PLAN)),
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-abc-session"].startswith("sess_")
        events = sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    for payload in events[:-1]:
        ChatCompletionChunk.model_validate_json(payload)


def test_embeddings_base64_on_the_wire_is_a_string(gw: Gateway) -> None:
    body = {"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"}
    response = httpx.post(
        gw.openai_base + "/embeddings", json=body, headers=bearer(gw.token(OPEN_PLAN))
    )
    assert response.status_code == 200
    assert isinstance(response.json()["data"][0]["embedding"], str)


def test_health_and_readiness_need_no_token(gw: Gateway) -> None:
    health = httpx.get(gw.base_url + "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = httpx.get(gw.base_url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] == "ok" and "mock" in ready.json()["providers"]
