"""The Responses and Messages translators: meaning kept both ways (tool-call ids, stop reasons,
multi-part content, cached tokens), streams that add up to the plain answer, stable ids."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import (
    BudgetExceeded,
    CapabilityDenied,
    GatewayError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from gateway.providers.mock import Faults, chat_chunks, chat_completion
from gateway.translate import messages, responses
from gateway.translate.common import Tokens, derived_id, message_tokens, response_tokens

LOOKUP = {"type": "function", "function": {"name": "lookup_order", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}


def _chat(content: str | None, finish: str, *, calls: list[dict[str, Any]] | None = None, cached: int = 0) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {"id": "chatcmpl-1", "created": 1_700_000_123, "model": "m", "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": cached}}}


CALL = {"id": "call_abc", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A-1"}'}}


@pytest.mark.parametrize(("finish", "stop_reason", "status"), [
    ("stop", "end_turn", "completed"), ("length", "max_tokens", "incomplete"),
    ("tool_calls", "tool_use", "completed"), ("content_filter", "refusal", "incomplete"),
])
def test_stop_reasons_map_to_each_dialect(finish: str, stop_reason: str, status: str) -> None:
    chat = _chat("hi", finish)
    assert messages.from_chat(chat, "msg_1")["stop_reason"] == stop_reason
    assert responses.from_chat(chat, {}, responses.Ids("resp_1"), created_at=0)["status"] == status


def test_tool_call_ids_survive_every_direction() -> None:
    chat = _chat(None, "tool_calls", calls=[CALL])
    item = responses.from_chat(chat, {}, responses.Ids("resp_1"), created_at=0)["output"][0]
    assert (item["type"], item["call_id"], item["name"]) == ("function_call", "call_abc", "lookup_order")
    block = messages.from_chat(chat, "msg_1")["content"][0]
    assert block == {"type": "tool_use", "id": "call_abc", "name": "lookup_order", "input": {"order_id": "A-1"}}
    # And back: the ids a client returns become the chat ids the upstream issued.
    back = messages.to_chat({"model": "m", "messages": [
        {"role": "user", "content": "where?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Looking."}, block]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_abc", "content": "shipped"},
                                     {"type": "text", "text": "thanks"}]}]})
    assert back["messages"][1] == {"role": "assistant", "content": "Looking.", "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id":"A-1"}'}}]}
    assert back["messages"][2:] == [{"role": "tool", "tool_call_id": "call_abc", "content": "shipped"},
                                    {"role": "user", "content": "thanks"}]
    turn = responses.to_chat({"model": "m", "input": [item, {"type": "function_call_output", "call_id": "call_abc", "output": "ok"}]}, [])
    assert turn["messages"][0]["tool_calls"][0]["id"] == "call_abc"
    assert turn["messages"][1] == {"role": "tool", "tool_call_id": "call_abc", "content": "ok"}


def test_parallel_function_calls_are_one_assistant_turn() -> None:
    second = {**CALL, "id": "call_def"}
    chat = _chat(None, "tool_calls", calls=[CALL, second])
    output = responses.from_chat(chat, {}, responses.Ids("resp_1"), created_at=0)["output"]
    back = responses.to_chat({"model": "m", "input": output}, [])
    assert [c["id"] for c in back["messages"][0]["tool_calls"]] == ["call_abc", "call_def"]
    assert len({item["id"] for item in output}) == 2


def test_multi_part_content_keeps_its_parts() -> None:
    chat = responses.to_chat({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": "https://example.test/a.png", "detail": "low"}]}]}, [])
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.test/a.png", "detail": "low"}}]
    anth = messages.to_chat({"model": "m", "system": [{"type": "text", "text": "Be brief."}], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "see"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]})
    assert anth["messages"][0] == {"role": "system", "content": "Be brief."}
    assert anth["messages"][1]["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def test_request_options_map_to_chat() -> None:
    chat = responses.to_chat({"model": "m", "input": "hi", "instructions": "Be brief.", "max_output_tokens": 50,
                              "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                              "tool_choice": {"type": "function", "name": "f"}, "temperature": 0,
                              "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}}}, [])
    assert chat["max_tokens"] == 50 and chat["temperature"] == 0
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
    anth = messages.to_chat({"model": "m", "max_tokens": 9, "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
                             "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                             "messages": [{"role": "user", "content": "hi"}]})
    assert (anth["max_tokens"], anth["stop"], anth["user"]) == (9, ["END"], "u1")
    assert (anth["tool_choice"], anth["parallel_tool_calls"]) == ("required", False)


def test_cached_input_tokens_are_reported_in_each_dialect_and_read_back() -> None:
    chat = _chat("hi", "stop", cached=6)
    usage = responses.from_chat(chat, {}, responses.Ids("resp_1"), created_at=0)["usage"]
    assert usage["input_tokens"] == 10 and usage["input_tokens_details"] == {"cached_tokens": 6}
    assert response_tokens(usage) == Tokens(10, 4, 6)
    anth = messages.from_chat(chat, "msg_1")["usage"]
    assert anth == {"input_tokens": 4, "output_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 6}
    assert message_tokens(anth) == Tokens(10, 4, 6)  # billed on every prompt token, cached or not


def test_usage_without_an_input_count_is_none_and_garbage_counts_read_as_zero() -> None:
    assert response_tokens({"output_tokens": 3}) is None and message_tokens("usage") is None
    assert response_tokens({"input_tokens": 5, "output_tokens": "3", "input_tokens_details": []}) == Tokens(5, 0, 0)
    assert message_tokens({"input_tokens": 5, "cache_creation_input_tokens": 2, "cache_read_input_tokens": None}) == Tokens(7, 0, 0)


@pytest.mark.parametrize("tools", [False, True])
def test_a_translated_stream_adds_up_to_the_plain_answer(tools: bool) -> None:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}],
                            "stream_options": {"include_usage": True}}
    if tools:
        body["tools"] = [LOOKUP]
    plain, chunks = chat_completion(body), chat_chunks(body, Faults.of(""))
    ids = responses.Ids("resp_x")
    translator = responses.ChatToResponses({}, ids, created_at=0, model=plain["model"])
    events = translator.start() + [e for c in chunks for e in translator.feed(c)]
    events += translator.finish(Tokens(plain["usage"]["prompt_tokens"], plain["usage"]["completion_tokens"]))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"] == responses.from_chat(plain, {}, ids, created_at=0)

    anth = messages.ChatToMessages("msg_x", model=plain["model"])
    events = anth.start() + [e for c in chunks for e in anth.feed(c)]
    events += anth.finish(Tokens(plain["usage"]["prompt_tokens"], plain["usage"]["completion_tokens"]))
    meter = messages.MessagesMeter()
    for event in events:
        meter.observe(event)
    expected = messages.from_chat(plain, "msg_x")
    assert meter.done and events[-2]["delta"]["stop_reason"] == expected["stop_reason"]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    block = expected["content"][0]
    if tools:
        assert orjson.loads("".join(d["partial_json"] for d in deltas)) == block["input"]
    else:
        assert "".join(d["text"] for d in deltas) == block["text"]
    assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]


def test_ids_are_derived_so_the_same_call_gives_the_same_bytes() -> None:
    assert derived_id("resp_", "req_1", "chatcmpl-9") == derived_id("resp_", "req_1", "chatcmpl-9")
    assert derived_id("resp_", "req_1", "chatcmpl-9") != derived_id("resp_", "req_2", "chatcmpl-9")
    one = orjson.dumps(responses.from_chat(_chat("hi", "stop"), {"input": "x"}, responses.Ids("resp_1"), created_at=5))
    assert one == orjson.dumps(responses.from_chat(_chat("hi", "stop"), {"input": "x"}, responses.Ids("resp_1"), created_at=9))


@pytest.mark.parametrize(("error", "kind"), [
    (InvalidRequest("x"), "invalid_request_error"), (CapabilityDenied("x"), "permission_error"),
    (NotFound("x"), "not_found_error"), (BudgetExceeded("x"), "rate_limit_error"),
    (ServiceUnavailable("x"), "overloaded_error"), (GatewayError("x"), "api_error"),
])
def test_errors_take_anthropics_shape(error: GatewayError, kind: str) -> None:
    body = orjson.loads(messages.error_body(error, "req_1"))
    assert body == {"type": "error", "error": {"type": kind, "message": "x", "code": error.code}, "request_id": "req_1"}


@pytest.mark.parametrize("body", [
    {"model": "m", "input": 3}, {"model": "m", "input": [{"type": "item_reference", "id": "x"}]},
    {"model": "m", "input": "x", "background": True}, {"model": "m", "input": [{"role": "robot", "content": "x"}]},
    {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
])
def test_responses_bodies_it_cannot_carry_are_400(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        responses.to_chat(body, [])


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": []}, {"model": "m", "messages": [{"role": "system", "content": "x"}]},
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "maybe"}},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_q": 1},
])
def test_messages_bodies_it_cannot_carry_are_400(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        messages.to_chat(body)
