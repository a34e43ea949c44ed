"""The Responses API and Anthropic Messages through a real gateway and the mock provider, with
the official `openai` and `anthropic` SDKs: text, tools, streams, a two-turn conversation by
`previous_response_id`, stored responses, and each kind of denial in each SDK's own terms."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import OPEN_PLAN, Gateway
from tests.openai_support import TIMEOUT_S, journal, sdk

LOOKUP = {
    "type": "function", "name": "lookup_order", "description": "Find an order by id",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}
LOOKUP_ANTHROPIC = {
    "name": "lookup_order", "description": "Find an order by id",
    "input_schema": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
}


def claude(gw: Gateway, token: str, *, bearer: bool = False) -> anthropic.Anthropic:
    if bearer:
        return anthropic.Anthropic(base_url=gw.base_url, auth_token=token, max_retries=0, timeout=TIMEOUT_S)
    return anthropic.Anthropic(base_url=gw.base_url, api_key=token, max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture
def opened(gw: Gateway) -> dict[str, Any]:
    return gw.open_session(OPEN_PLAN)


def test_responses_create_answers_text_with_usage_and_cost(gw: Gateway, opened: dict[str, Any], redis_url: str) -> None:
    client = sdk(gw, opened["token"])
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="hello there", instructions="Be brief.")
    response = raw.parse()
    assert response.status == "completed" and response.id.startswith("resp_")
    assert response.output_text and response.output[0].type == "message"
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.instructions == "Be brief."
    assert float(raw.headers["x-abc-cost-usd"]) > 0
    kinds = [(e["kind"], e.get("endpoint")) for e in journal(redis_url, opened["session_id"]) if e["kind"] != "state"]
    assert kinds == [("request", "responses"), ("response", None)]


def test_responses_function_call_then_its_output_in_a_second_turn(gw: Gateway, opened: dict[str, Any]) -> None:
    client = sdk(gw, opened["token"])
    first = client.responses.create(model="gpt-4o-mini", input="Where is order A-1?", tools=[LOOKUP])  # type: ignore[list-item]
    call = first.output[0]
    assert call.type == "function_call" and call.name == "lookup_order"
    assert "order_id" in json.loads(call.arguments)
    second = client.responses.create(
        model="gpt-4o-mini", previous_response_id=first.id, tools=[LOOKUP],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"status": "shipped"}'}],
    )
    assert second.status == "completed" and second.output_text
    assert second.previous_response_id == first.id
    # The second turn's prompt held the first turn: more input tokens than the tool result alone.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_responses_stream_sends_typed_events_and_a_final_response(gw: Gateway, opened: dict[str, Any]) -> None:
    client = sdk(gw, opened["token"])
    with client.responses.stream(model="gpt-4o-mini", input="hello there") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    assert final.output_text and final.usage is not None and final.usage.output_tokens > 0
    plain = client.responses.create(model="gpt-4o-mini", input="hello there")
    assert plain.output_text == final.output_text  # the mock says the same either way


def test_responses_stream_of_a_function_call(gw: Gateway, opened: dict[str, Any]) -> None:
    client = sdk(gw, opened["token"])
    with client.responses.stream(model="gpt-4o-mini", input="Where is A-1?", tools=[LOOKUP]) as stream:  # type: ignore[list-item]
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    call = final.output[0]
    assert call.type == "function_call" and call.name == "lookup_order" and json.loads(call.arguments)


def test_a_stored_response_is_served_to_its_session_only(gw: Gateway, opened: dict[str, Any]) -> None:
    client = sdk(gw, opened["token"])
    created = client.responses.create(model="gpt-4o-mini", input="hello there")
    assert client.responses.retrieve(created.id).model_dump() == created.model_dump()
    other = sdk(gw, gw.token(OPEN_PLAN))
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="gpt-4o-mini", input="and then?", previous_response_id=created.id)
    unstored = client.responses.create(model="gpt-4o-mini", input="hello there", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_a_streamed_response_is_stored_and_continues_a_conversation(gw: Gateway, opened: dict[str, Any]) -> None:
    client = sdk(gw, opened["token"])
    with client.responses.stream(model="gpt-4o-mini", input="hello there") as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).output_text == final.output_text
    follow = client.responses.create(model="gpt-4o-mini", input="go on", previous_response_id=final.id)
    assert follow.status == "completed"


def test_messages_create_with_x_api_key_or_bearer(gw: Gateway, opened: dict[str, Any]) -> None:
    for bearer in (False, True):
        message = claude(gw, opened["token"], bearer=bearer).messages.create(
            model="gpt-4o-mini", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "hello there"}],
        )
        assert message.type == "message" and message.role == "assistant"
        assert message.content[0].type == "text" and message.content[0].text
        assert message.stop_reason in ("end_turn", "max_tokens")
        assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_messages_tool_use_then_tool_result(gw: Gateway, opened: dict[str, Any]) -> None:
    client = claude(gw, opened["token"])
    question = {"role": "user", "content": "Where is order A-1?"}
    first = client.messages.create(model="gpt-4o-mini", max_tokens=128, messages=[question], tools=[LOOKUP_ANTHROPIC])  # type: ignore[list-item]
    assert first.stop_reason == "tool_use"
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "lookup_order" and isinstance(use.input, dict)
    second = client.messages.create(
        model="gpt-4o-mini", max_tokens=128, tools=[LOOKUP_ANTHROPIC],  # type: ignore[list-item]
        messages=[question, {"role": "assistant", "content": first.content},  # type: ignore[list-item]
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "shipped"}]}],
    )
    assert second.stop_reason != "tool_use" and second.content[0].type == "text"


def test_messages_stream_text_and_tools(gw: Gateway, opened: dict[str, Any]) -> None:
    client = claude(gw, opened["token"])
    with client.messages.stream(model="gpt-4o-mini", max_tokens=64, messages=[{"role": "user", "content": "hello there"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.output_tokens > 0
    with client.messages.stream(model="gpt-4o-mini", max_tokens=128, tools=[LOOKUP_ANTHROPIC],  # type: ignore[list-item]
                                messages=[{"role": "user", "content": "Where is A-1?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    use = final.content[-1]
    assert use.type == "tool_use" and use.name == "lookup_order" and "order_id" in use.input


TIGHT_PLAN: dict[str, Any] = {**OPEN_PLAN, "name": "tight", "tools": [], "budget": {"usd": 0.000001}}


def test_denials_in_the_openai_sdk_terms(gw: Gateway) -> None:
    client = sdk(gw, gw.token({**OPEN_PLAN, "name": "no-tools", "tools": []}))
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model="local-llama", input="hi")  # a model the VCS leaves out
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model="gpt-4o-mini", input="hi", tools=[LOOKUP])  # type: ignore[list-item]
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=100_000)
    broke = sdk(gw, gw.token(TIGHT_PLAN))
    with pytest.raises(openai.RateLimitError) as caught:
        broke.responses.create(model="gpt-4o-mini", input="hi")
    assert caught.value.code == "budget_exceeded"


def test_denials_in_the_anthropic_sdk_terms(gw: Gateway) -> None:
    client = claude(gw, gw.token({**OPEN_PLAN, "name": "no-tools", "tools": []}))
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        client.messages.create(model="local-llama", max_tokens=16, messages=hello)  # type: ignore[arg-type]
    assert denied.value.body == {"type": "error", "error": denied.value.body["error"], "request_id": denied.value.body["request_id"]}  # type: ignore[index]
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.create(model="gpt-4o-mini", max_tokens=16, messages=hello, tools=[LOOKUP_ANTHROPIC])  # type: ignore[arg-type,list-item]
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.create(model="gpt-4o-mini", max_tokens=100_000, messages=hello)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError) as limited:
        claude(gw, gw.token(TIGHT_PLAN)).messages.create(model="gpt-4o-mini", max_tokens=16, messages=hello)  # type: ignore[arg-type]
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        claude(gw, "not-a-token").messages.create(model="gpt-4o-mini", max_tokens=16, messages=hello)  # type: ignore[arg-type]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=16, messages=hello)  # type: ignore[arg-type]


def test_bad_dialect_bodies_are_400_in_the_right_shape(gw: Gateway, opened: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {opened['token']}"}
    bad = httpx.post(gw.base_url + "/v1/messages", json={"model": "gpt-4o-mini", "messages": "hi"}, headers=headers)
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"
    bad = httpx.post(gw.base_url + "/v1/responses", json={"model": "gpt-4o-mini", "input": 3}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
    bad = httpx.post(gw.base_url + "/v1/responses", json={"model": "gpt-4o-mini", "input": "x", "nope": 1}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "nope"
