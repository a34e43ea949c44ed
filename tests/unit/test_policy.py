"""The PEP, rule by rule: each has an allowed case and a denied one, plus a property test."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.assembly.model import (
    Assembly,
    FrozenPrice,
    ModelGrant,
    Step,
    ToolGrant,
    Vcs,
)
from gateway.errors import (
    CapabilityDenied,
    GatewayError,
    InvalidRequest,
    NotFound,
    StateConflict,
)
from gateway.pipeline.policy import Grant, authorize, check_output, tool_call_names
from gateway.pipeline.request_fields import redact_overrides
from gateway.pipeline.usage import StreamMeter
from gateway.providers.base import Endpoint

PRICE = FrozenPrice(input_nanos_per_mtok=150_000, output_nanos_per_mtok=600_000, source="settings")
KNOWN = frozenset({"gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "davinci-002", "o3"})
CHAT = Endpoint.CHAT


def model_grant(name: str = "gpt-4o-mini", **fields: Any) -> ModelGrant:
    values: dict[str, Any] = {
        "name": name,
        "provider": "local",
        "provider_kind": "openai",
        "upstream_model": f"{name}-pinned",
        "max_tokens": 512,
        "price": PRICE,
    }
    values.update(fields)
    return ModelGrant(**values)


def make_assembly(
    *models: ModelGrant,
    tools: tuple[str, ...] = ("lookup_order",),
    builtin: tuple[str, ...] = (),
    steps: tuple[Step, ...] = (),
) -> Assembly:
    models = models or (model_grant(params={"temperature": 0}),)
    return Assembly(
        name="support-bot",
        models={m.name: m for m in models},
        tools={t: ToolGrant(name=t) for t in tools},
        vcs=Vcs(models=tuple(m.name for m in models), tools=tools, builtin_tools=builtin),
        steps=steps,
    )


ASM = make_assembly()
PLAIN = make_assembly(model_grant())  # no pinned params


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields}


def fn_tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {}}}


def ok(body: dict[str, Any], asm: Assembly = ASM, endpoint: Endpoint = CHAT) -> Grant:
    return authorize(asm, endpoint, body, known_models=KNOWN)


def refused(
    kind: type[GatewayError],
    body: Any,
    asm: Assembly = ASM,
    endpoint: Endpoint = CHAT,
) -> GatewayError:
    with pytest.raises(kind) as caught:
        authorize(asm, endpoint, body, known_models=KNOWN)
    return caught.value


def rule(error: GatewayError) -> str:
    return str(error.extra["rule"])


# --- body and model -------------------------------------------------------------------


@pytest.mark.parametrize("body", [[], "x", None, 3])
def test_a_body_that_is_not_an_object_is_invalid(body: Any) -> None:
    refused(InvalidRequest, body)


@pytest.mark.parametrize("value", [None, "", "   ", 3, ["gpt-4o-mini"]])
def test_model_must_be_a_non_empty_string(value: Any) -> None:
    body = chat()
    body["model"] = value
    assert refused(InvalidRequest, body).param == "model"
    del body["model"]
    assert refused(InvalidRequest, body).param == "model"


def test_model_name_is_trimmed_and_case_folded_then_pinned_upstream() -> None:
    grant = ok(chat(model=" GPT-4o-Mini "))
    assert grant.model.name == "gpt-4o-mini"
    assert grant.body["model"] == "gpt-4o-mini-pinned"


def test_a_configured_model_outside_the_vcs_is_denied() -> None:
    error = refused(CapabilityDenied, chat(model="GPT-4o"))
    assert error.status == 403 and rule(error) == "model_not_allowed"
    assert "gpt-4o" in error.message


def test_an_unknown_model_is_not_found() -> None:
    error = refused(NotFound, chat(model="no-such-model"))
    assert error.status == 404 and error.code == "model_not_found"


def test_a_model_in_the_grants_but_not_the_vcs_is_denied() -> None:
    asm = ASM.model_copy(update={"vcs": Vcs(models=(), tools=("lookup_order",))})
    assert rule(refused(CapabilityDenied, chat(), asm)) == "model_not_allowed"


def test_model_kind_must_fit_the_endpoint() -> None:
    embed = model_grant("text-embedding-3-small", kind="embedding")
    asm = make_assembly(model_grant(), embed)
    error = refused(InvalidRequest, chat(model="text-embedding-3-small"), asm)
    assert rule(error) == "model_endpoint_mismatch"
    refused(InvalidRequest, {"model": "gpt-4o-mini", "input": "hi"}, asm, Endpoint.EMBEDDINGS)
    grant = ok({"model": "text-embedding-3-small", "input": "hi"}, asm, Endpoint.EMBEDDINGS)
    assert "max_tokens" not in grant.body and grant.max_output_tokens == 0 and grant.n == 1


# --- upstream overrides ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "api_base", "base_url", "deployment_id", "custom_llm_provider", "api_key",
        "extra_headers", "user_config", "litellm_params", "headers", "provider", "url",
        "request_timeout", " API-Base ", "Base_URL", "apiBase",
    ],
)  # fmt: skip
def test_top_level_override_keys_are_denied(key: str) -> None:
    error = refused(CapabilityDenied, chat(**{key: "http://evil.example"}))
    assert error.status == 403 and rule(error) == "upstream_override"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("metadata", {"api_base": "http://evil.example"}),
        ("metadata", {"tags": [{"deep": {"Custom-LLM-Provider": "azure"}}]}),
        ("extra_body", {"custom_llm_provider": "azure"}),
        ("extra_body", {"nested": {"azure_endpoint": "x"}}),
        ("stream_options", {"include_usage": True, "base_url": "x"}),
    ],
)
def test_nested_override_keys_are_denied(field: str, value: dict[str, Any]) -> None:
    error = refused(CapabilityDenied, chat(stream=True, **{field: value}))
    assert rule(error) == "upstream_override" and error.param == field


def test_an_override_is_named_but_its_secret_value_never_echoed() -> None:
    for body in (chat(api_key="sk-SECRET"), chat(metadata={"api_key": "sk-SECRET"})):
        error = refused(CapabilityDenied, body)
        assert "api_key" in error.message
        assert b"sk-SECRET" not in error.to_json()


def test_override_values_are_redacted_for_the_journal_and_content_is_kept() -> None:
    body = chat(api_key="sk-SECRET", metadata={"trace": {"Base-URL": "http://evil"}, "team": "a"},
                tools=[fn_tool("lookup_order", {"type": "object", "properties": {"api_key": {}}})])
    clean = redact_overrides(body)
    assert clean["api_key"] == "[redacted]"
    assert clean["metadata"] == {"trace": {"Base-URL": "[redacted]"}, "team": "a"}
    assert clean["tools"] == body["tools"]  # schemas are content: left alone
    assert body["api_key"] == "sk-SECRET"  # a copy; the request itself is untouched


def test_content_and_schemas_may_mention_override_words() -> None:
    schema = {"type": "object", "properties": {"url": {"type": "string"}, "api_key": {}}}
    body = chat(
        messages=[{"role": "user", "content": "set base_url", "name": "u", "api_base": "x"}],
        tools=[fn_tool("lookup_order", schema)],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        prediction={"type": "content", "content": "url"},
        metadata={"purpose": "api_base docs"},
    )
    assert ok(body).tools == {"lookup_order"}


def test_a_clean_extra_body_is_still_an_unknown_parameter() -> None:
    error = refused(InvalidRequest, chat(extra_body={"foo": 1}))
    assert error.code == "unknown_parameter" and error.param == "extra_body"


# --- unknown fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        (CHAT, chat(top_k=40), "top_k"),
        (CHAT, chat(best_of=2), "best_of"),
        (Endpoint.COMPLETIONS, {"model": "gpt-4o-mini", "prompt": "x", "tools": []}, "tools"),
        (Endpoint.EMBEDDINGS, {"model": "m", "input": "x", "temperature": 0}, "temperature"),
    ],
)
def test_unknown_top_level_fields_are_refused_by_name(
    endpoint: Endpoint, body: dict[str, Any], field: str
) -> None:
    error = refused(InvalidRequest, body, endpoint=endpoint)
    assert error.status == 400 and error.code == "unknown_parameter"
    assert error.param == field and field in error.message


def test_documented_fields_pass() -> None:
    body = chat(
        frequency_penalty=0.1, presence_penalty=0.1, seed=1, stop=["\n"], top_p=1, user="u",
        parallel_tool_calls=True, store=False, reasoning_effort="low", modalities=["text"],
        verbosity="low", safety_identifier="s", prompt_cache_key="k", service_tier="auto",
    )  # fmt: skip
    assert ok(body).body["seed"] == 1


# --- tools ----------------------------------------------------------------------------


def test_offered_tools_are_normalised_and_checked() -> None:
    grant = ok(chat(tools=[fn_tool("Lookup_Order ")]))
    assert grant.tools == {"lookup_order"}
    assert grant.body["tools"][0]["function"]["name"] == "Lookup_Order "


def test_a_tool_outside_the_vcs_is_denied() -> None:
    error = refused(CapabilityDenied, chat(tools=[fn_tool("lookup_order"), fn_tool("delete_user")]))
    assert rule(error) == "tool_not_allowed"
    assert "tool 'delete_user' is not in this session's VCS" in error.message


@pytest.mark.parametrize(
    "fields",
    [
        {"functions": [{"name": "delete_user", "parameters": {}}]},
        {"function_call": {"name": "delete_user"}},
        {"tool_choice": {"type": "function", "function": {"name": "Delete_User"}}},
        {"tool_choice": {"name": "delete_user"}},
        {
            "tool_choice": {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "auto", "tools": [fn_tool("delete_user")]},
            }
        },
    ],
)
def test_every_place_that_can_name_a_tool_is_checked(fields: dict[str, Any]) -> None:
    body = chat(tools=[fn_tool("lookup_order")], **fields)
    assert rule(refused(CapabilityDenied, body)) == "tool_not_allowed"


def test_legacy_functions_and_choices_naming_allowed_tools_pass() -> None:
    body = chat(functions=[{"name": " LOOKUP_ORDER"}], function_call={"name": "lookup_order"})
    assert ok(body).tools == {"lookup_order"}
    body = chat(tools=[fn_tool("lookup_order")], tool_choice={"name": "Lookup_Order"})
    assert ok(body).tools == {"lookup_order"}
    assert ok(chat(tools=[fn_tool("lookup_order")], tool_choice="required")).tools == {
        "lookup_order"
    }
    assert ok(chat(function_call="auto")).tools == frozenset()


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search"},
        {"type": "web_search_preview"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter"},
        {"type": "mcp", "server_url": "https://mcp.example", "server_label": "x"},
        {"type": "computer_use_preview"},
        {"type": "image_generation"},
        {"type": "custom", "custom": {"name": "x"}},
    ],
)
def test_builtin_tool_types_are_denied_unless_whitelisted(tool: dict[str, Any]) -> None:
    error = refused(CapabilityDenied, chat(tools=[tool]))
    assert rule(error) == "builtin_tool_not_allowed" and tool["type"] in error.message
    asm = make_assembly(builtin=(tool["type"],))
    assert ok(chat(tools=[{**tool, "type": f" {tool['type'].upper()} "}]), asm).tools == frozenset()


def test_web_search_options_counts_as_the_web_search_builtin() -> None:
    body = chat(web_search_options={"search_context_size": "low"})
    assert rule(refused(CapabilityDenied, body)) == "builtin_tool_not_allowed"
    ok(body, make_assembly(builtin=("web_search",)))
    body = chat(tool_choice={"type": "web_search_preview"})
    assert rule(refused(CapabilityDenied, body)) == "builtin_tool_not_allowed"


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": {"type": "function"}},
        {"tools": ["lookup_order"]},
        {"tools": [{"function": {"name": "lookup_order"}}]},
        {"tools": [{"type": "function"}]},
        {"tools": [{"type": "function", "function": {"parameters": {}}}]},
        {"tools": [{"type": "function", "function": {"name": "  "}}]},
        {"tools": [{"type": "function", "function": {"name": 7}}]},
        {"functions": {"name": "lookup_order"}},
        {"functions": ["lookup_order"]},
        {"functions": [{"description": "no name"}]},
        {"tool_choice": "sometimes"},
        {"tool_choice": 3},
        {"tool_choice": {"type": "function", "function": {}}},
        {"tool_choice": {"type": "allowed_tools"}},
        {"function_call": "required"},
        {"function_call": {}},
    ],
)
def test_malformed_tools_are_invalid(fields: dict[str, Any]) -> None:
    assert rule(refused(InvalidRequest, chat(**fields))) == "invalid_tools"


# --- max_tokens -----------------------------------------------------------------------


def test_a_missing_max_tokens_is_set_to_the_cap() -> None:
    grant = ok(chat())
    assert grant.body["max_tokens"] == 512 and grant.max_output_tokens == 512
    grant = ok(chat(max_tokens=None, max_completion_tokens=None))
    assert grant.body["max_tokens"] == 512 and "max_completion_tokens" not in grant.body
    prompt = {"model": "davinci-002", "prompt": "x"}
    asm = make_assembly(model_grant("davinci-002", kind="completion", max_tokens=64))
    assert ok(prompt, asm, Endpoint.COMPLETIONS).body["max_tokens"] == 64


def test_max_tokens_under_the_cap_is_kept() -> None:
    grant = ok(chat(max_tokens=100))
    assert grant.body["max_tokens"] == 100 and grant.max_output_tokens == 100
    grant = ok(chat(max_completion_tokens=200))
    assert grant.body["max_completion_tokens"] == 200 and "max_tokens" not in grant.body
    assert grant.max_output_tokens == 200
    assert ok(chat(max_tokens=512, max_completion_tokens=100)).max_output_tokens == 512


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 513},
        {"max_completion_tokens": 100_000},
        {"max_tokens": 100, "max_completion_tokens": 513},
        {"max_tokens": 513, "max_completion_tokens": 100},
    ],
)
def test_max_tokens_above_the_cap_is_denied(fields: dict[str, Any]) -> None:
    error = refused(CapabilityDenied, chat(**fields))
    assert rule(error) == "max_tokens_cap" and "512" in error.message


@pytest.mark.parametrize("value", [0, -1, 1.5, 100.0, "100", True])
def test_max_tokens_must_be_a_positive_integer(value: Any) -> None:
    assert refused(InvalidRequest, chat(max_tokens=value)).param == "max_tokens"
    assert refused(InvalidRequest, chat(max_completion_tokens=value)).param == (
        "max_completion_tokens"
    )


# --- pinned params, n, logprobs, logit_bias, stream -----------------------------------


def test_pinned_params_are_filled_in_and_may_be_repeated() -> None:
    assert ok(chat()).body["temperature"] == 0
    assert ok(chat(temperature=0.0)).body["temperature"] == 0.0
    assert ok(chat(temperature=None)).body["temperature"] == 0


@pytest.mark.parametrize("value", [0.7, 1, 2])
def test_a_pinned_param_may_not_be_changed(value: Any) -> None:
    error = refused(CapabilityDenied, chat(temperature=value))
    assert rule(error) == "pinned_param" and error.param == "temperature"
    assert "pinned to 0" in error.message


@pytest.mark.parametrize("value", ["0", False, -0.1, 2.5])
def test_a_pinned_param_sent_outside_its_schema_is_invalid_before_the_pin(value: Any) -> None:
    assert refused(InvalidRequest, chat(temperature=value)).param == "temperature"


def test_n_is_limited_to_the_model_max_n() -> None:
    assert ok(chat()).n == 1
    assert rule(refused(CapabilityDenied, chat(n=2))) == "n_not_allowed"
    asm = make_assembly(model_grant(max_n=4))
    assert ok(chat(n=3), asm).n == 3
    assert rule(refused(CapabilityDenied, chat(n=5), asm)) == "n_not_allowed"
    assert refused(InvalidRequest, chat(n=0), asm).param == "n"


def test_best_of_is_limited_and_counted_like_n() -> None:
    asm = make_assembly(model_grant("davinci-002", kind="completion", max_n=3))
    body = {"model": "davinci-002", "prompt": "x", "n": 1, "best_of": 3}
    assert ok(body, asm, Endpoint.COMPLETIONS).n == 3
    error = refused(CapabilityDenied, {**body, "best_of": 4}, asm, Endpoint.COMPLETIONS)
    assert rule(error) == "n_not_allowed" and error.param == "best_of"


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (CHAT, chat(logprobs=True)),
        (CHAT, chat(top_logprobs=0)),
        (CHAT, chat(logprobs=True, top_logprobs=3)),
        (Endpoint.COMPLETIONS, {"model": "davinci-002", "prompt": "x", "logprobs": 0}),
    ],
)
def test_logprobs_need_the_model_to_allow_them(endpoint: Endpoint, body: dict[str, Any]) -> None:
    denying = make_assembly(model_grant(), model_grant("davinci-002", kind="completion"))
    assert rule(refused(CapabilityDenied, body, denying, endpoint)) == "logprobs_not_allowed"
    allowing = make_assembly(
        model_grant(allow_logprobs=True),
        model_grant("davinci-002", kind="completion", allow_logprobs=True),
    )
    ok(body, allowing, endpoint)


def test_logprobs_false_is_not_a_request_for_logprobs() -> None:
    ok(chat(logprobs=False, top_logprobs=None))


def test_logit_bias_needs_the_model_to_allow_it() -> None:
    ok(chat(logit_bias={}))
    error = refused(CapabilityDenied, chat(logit_bias={"50256": -100}))
    assert rule(error) == "logit_bias_not_allowed"
    ok(chat(logit_bias={"50256": -100}), make_assembly(model_grant(allow_logit_bias=True)))
    assert refused(InvalidRequest, chat(logit_bias=[1])).param == "logit_bias"


def test_stream_must_be_a_boolean_and_stream_options_need_it() -> None:
    assert ok(chat()).stream is False
    assert ok(chat(stream=True, stream_options={"include_usage": True})).stream is True
    assert refused(InvalidRequest, chat(stream="yes")).param == "stream"
    error = refused(InvalidRequest, chat(stream_options={"include_usage": True}))
    assert error.param == "stream_options"
    assert refused(InvalidRequest, chat(stream=True, stream_options=1)).param == "stream_options"


# --- the upstream body ----------------------------------------------------------------


def test_the_input_body_is_never_mutated_and_messages_are_not_copied() -> None:
    body = chat(model=" GPT-4o-Mini ", tools=[fn_tool("lookup_order")], max_tokens=None)
    before = copy.deepcopy(body)
    grant = ok(body)
    assert body == before
    assert grant.body is not body
    assert grant.body["messages"] is body["messages"]
    assert grant.body["model"] == "gpt-4o-mini-pinned"


# --- output ---------------------------------------------------------------------------


def test_tool_call_names_of_a_complete_message() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup_order"}},
            {"id": "c2", "type": "function", "function": {"name": "delete_user"}},
        ],
        "function_call": {"name": "refund", "arguments": "{}"},
    }
    assert tool_call_names(message) == ["lookup_order", "delete_user", "refund"]
    assert tool_call_names({"role": "assistant", "content": "hi"}) == []


def test_tool_call_names_of_stream_deltas() -> None:
    first = {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                             "function": {"name": "lookup_order", "arguments": ""}}]}  # fmt: skip
    later = {"tool_calls": [{"index": 0, "function": {"arguments": '{"order_id": 1}'}}]}
    assert tool_call_names(first) == ["lookup_order"]
    assert tool_call_names(later) == []
    assert tool_call_names({"function_call": {"arguments": "{}"}}) == []
    assert tool_call_names({"content": "x", "tool_calls": None}) == []


def test_a_stream_meter_names_the_tools_each_chunk_calls_for_the_output_pep() -> None:
    meter = StreamMeter(model=None, prompt_estimate=0)  # type: ignore[arg-type]  # observe() never reads it
    def chunk(**delta: Any) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": delta}]}

    meter.observe(chunk(content="Looking it up"))
    assert meter.called == ()
    meter.observe(chunk(tool_calls=[{"index": 0, "function": {"name": "lookup_order", "arguments": ""}}]))
    assert meter.called == ("lookup_order",)
    meter.observe(chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"order_id": 1}'}}]))
    assert meter.called == ()  # only a call's first fragment has the name
    meter.observe({"choices": [{"delta": {"function_call": {"name": "legacy", "arguments": ""}}},
                               {"delta": {"tool_calls": [{"function": {"name": "refund"}}]}}]})  # fmt: skip
    assert meter.called == ("legacy", "refund")
    assert meter.text == 'Looking it uplookup_order{"order_id": 1}refund'  # what is counted if usage never comes


def test_check_output_allows_offered_vcs_tools() -> None:
    grant = ok(chat(tools=[fn_tool("lookup_order")]))
    check_output(ASM, grant, ["Lookup_Order", " lookup_order"])
    check_output(ASM, grant, [])


def test_check_output_blocks_a_tool_outside_the_vcs() -> None:
    grant = ok(chat(tools=[fn_tool("lookup_order")]))
    with pytest.raises(CapabilityDenied) as caught:
        check_output(ASM, grant, tool_call_names({"tool_calls": [
            {"function": {"name": "delete_user", "arguments": "{}"}}]}))  # fmt: skip
    assert rule(caught.value) == "output_tool_call" and "delete_user" in caught.value.message


def test_check_output_blocks_a_vcs_tool_the_request_did_not_offer() -> None:
    grant = ok(chat())
    with pytest.raises(CapabilityDenied) as caught:
        check_output(ASM, grant, ["lookup_order"])
    assert rule(caught.value) == "output_tool_call" and "did not offer" in caught.value.message


# --- steps ----------------------------------------------------------------------------

STEPS = (
    Step(id="triage", model="gpt-4o-mini", tools=(), next=("answer",)),
    Step(id="answer", model="gpt-4o-mini", tools=("lookup_order",), next=("answer",)),
    Step(id="summarise", model="gpt-4o", tools=()),
)
STEPPED = make_assembly(
    model_grant(), model_grant("gpt-4o"), tools=("lookup_order", "refund"), steps=STEPS
)


def test_without_steps_there_are_no_candidates() -> None:
    assert ok(chat()).candidate_steps == ()


def test_candidate_steps_are_those_whose_model_and_tools_fit() -> None:
    assert ok(chat(), STEPPED).candidate_steps == ("triage", "answer")
    grant = ok(chat(tools=[fn_tool("Lookup_Order")]), STEPPED)
    assert grant.candidate_steps == ("answer",)
    assert ok(chat(model="GPT-4o"), STEPPED).candidate_steps == ("summarise",)


def test_a_request_no_step_fits_is_a_conflict_naming_the_model_steps() -> None:
    error = refused(StateConflict, chat(tools=[fn_tool("refund")]), STEPPED)
    assert error.status == 409 and rule(error) == "no_step_fits"
    assert error.extra["steps"] == ["triage", "answer"]
    assert "triage" in error.message and "refund" in error.message


def test_a_model_used_by_no_step_is_a_conflict_naming_every_step() -> None:
    asm = make_assembly(model_grant(), model_grant("o3"), steps=STEPS[:2])
    error = refused(StateConflict, chat(model="o3"), asm)
    assert rule(error) == "no_step_fits" and error.extra["steps"] == ["triage", "answer"]


# --- property: whatever comes in, only VCS tools and no overrides go out ----------------

BRIEF_OVERRIDES = frozenset({
    "api_base", "base_url", "api_key", "api_version", "api_type", "organization",
    "deployment_id", "azure_deployment", "azure_endpoint", "custom_llm_provider", "provider",
    "user_config", "extra_headers", "headers", "litellm_params", "model_list", "endpoint",
    "url", "region_name", "aws_region_name", "vertex_project", "vertex_location", "proxy",
    "request_timeout",
})  # fmt: skip
EXEMPT = frozenset({
    "messages", "tools", "functions", "response_format", "tool_choice", "prediction",
    "input", "prompt",
})  # fmt: skip
PROPERTY_ASM = make_assembly(
    model_grant(params={"temperature": 0}, max_n=2),
    tools=("lookup_order", "refund"),
    builtin=("web_search",),
)


def _override_variants(key: str) -> list[str]:
    return [key, key.upper(), f" {key} ", key.replace("_", "-")]


override_key = st.sampled_from(sorted(BRIEF_OVERRIDES)).flatmap(
    lambda k: st.sampled_from(_override_variants(k))
)
plain_key = st.sampled_from(["purpose", "trace", "tags", "x", "notes", "region"])
# Mostly harmless keys, so that enough bodies get through for the Grant checks to bite.
mixed_key = st.integers(0, 4).flatmap(lambda i: override_key if i == 0 else plain_key)
leaf = st.none() | st.booleans() | st.integers(-3, 600) | st.text(max_size=6)
nested = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(mixed_key, inner, max_size=3),
    max_leaves=8,
)
tool_name = st.sampled_from(
    ["lookup_order", " Lookup_Order ", "REFUND", "delete_user", "exec", "", "  "]
) | st.text(max_size=5)
tool_entry = st.one_of(
    tool_name.map(fn_tool),
    st.sampled_from(["web_search", "mcp", "code_interpreter", " Web_Search "]).map(
        lambda t: {"type": t}
    ),
    nested,
)
optional_fields: dict[str, st.SearchStrategy[Any]] = {
    "tools": st.lists(tool_entry, max_size=3) | nested,
    "functions": st.lists(tool_name.map(lambda n: {"name": n}), max_size=2) | nested,
    "tool_choice": st.sampled_from(["auto", "none", "required"])
    | tool_name.map(lambda n: {"type": "function", "function": {"name": n}})
    | tool_name.map(lambda n: {"name": n}),
    "function_call": st.sampled_from(["auto", "none"]) | tool_name.map(lambda n: {"name": n}),
    "metadata": st.dictionaries(mixed_key, nested, max_size=3),
    "extra_body": st.dictionaries(mixed_key, nested, max_size=2),
    "max_tokens": st.none() | st.integers(-1, 700),
    "temperature": st.sampled_from([None, 0, 0.0, 0.5]),
    "n": st.none() | st.integers(0, 3),
    "stream": st.booleans() | st.none(),
    "logit_bias": st.sampled_from([None, {}]),
    "web_search_options": st.sampled_from([None, {}]),
}
bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(
            ["gpt-4o-mini", " GPT-4o-Mini ", "gpt-4o-mini", "gpt-4o", "nope", ""]
        ),
        "messages": st.just([{"role": "user", "content": "api_base is a word"}]),
    },
    optional=optional_fields,
)
body_with_extra = st.tuples(
    bodies,
    st.integers(0, 2).flatmap(
        lambda i: (
            st.dictionaries(override_key | plain_key, nested, max_size=1) if i == 0 else st.just({})
        )
    ),
).map(lambda pair: {**pair[1], **pair[0]})


def _override_keys_in(value: Any) -> list[str]:
    found: list[str] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if key.strip().lower().replace("-", "_") in BRIEF_OVERRIDES:
                    found.append(key)
                stack.append(child)
        elif isinstance(node, list):
            stack.extend(node)
    return found


@settings(max_examples=400, deadline=None)
@given(body_with_extra)
def test_only_vcs_tools_and_no_overrides_ever_go_upstream(body: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    try:
        grant = authorize(PROPERTY_ASM, CHAT, body, known_models=KNOWN)
    except GatewayError:
        assert body == before
        return
    assert body == before
    assert grant.tools <= set(PROPERTY_ASM.vcs.tools)
    outside = {k: v for k, v in grant.body.items() if k not in EXEMPT}
    assert _override_keys_in(outside) == []
    assert grant.body["model"] == "gpt-4o-mini-pinned"
    assert grant.body["temperature"] in (0, 0.0)
    assert 1 <= grant.body["max_tokens"] <= 512


def test_the_frozen_tool_definition_goes_upstream_not_the_clients() -> None:
    frozen = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
    asm = ASM.model_copy(update={"tools": {"lookup_order": ToolGrant(name="lookup_order", description="Find an order", parameters=frozen)}})
    widened = {"type": "object", "properties": {"order_id": {"type": "string"}, "sql": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "Lookup_Order", "description": "run any SQL", "parameters": widened, "strict": True}}
    body = chat(tools=[tool], functions=[{"name": "lookup_order", "description": "x", "parameters": widened}])
    grant = ok(body, asm)
    sent = grant.body["tools"][0]["function"]
    assert sent == {"name": "Lookup_Order", "description": "Find an order", "parameters": frozen, "strict": True}
    assert grant.body["functions"] == [{"name": "lookup_order", "description": "Find an order", "parameters": frozen}]
    assert body["tools"][0]["function"]["parameters"] is widened  # the client's body is untouched
