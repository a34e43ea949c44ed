"""The PEP and the VCS token through a running gateway, seen from the official SDK:
what is not in the VCS is PermissionDeniedError (403), a bad, expired, revoked or foreign
token is AuthenticationError (401), and nothing denied is charged or forwarded."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import jwt
import openai
import pytest
import redis

from gateway.capability import Keyring, mint
from tests.conftest import SIGNING_SECRET, Gateway
from tests.openai_support import bearer, journal, openai_error, sdk

HELLO = [{"role": "user", "content": "hello"}]


def _function(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
    }


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": _function(name)}


PLAN: dict[str, Any] = {
    "name": "enforced",
    "tenant": "acme",
    "models": [
        {"name": "gpt-4o-mini", "max_tokens": 100, "max_n": 2, "params": {"temperature": 0}},
        {"name": "gpt-3.5-turbo-instruct", "max_tokens": 50},
        {"name": "text-embedding-3-small"},
    ],
    "tools": [{"name": "lookup_order", "parameters": _function("lookup_order")["parameters"]}],
    "budget": {"usd": 1},
}



@pytest.fixture
def opened(gw: Gateway) -> dict[str, Any]:
    return gw.open_session(PLAN)


@pytest.fixture
def client(gw: Gateway, opened: dict[str, Any]) -> openai.OpenAI:
    return sdk(gw, opened["token"])


def _denied(client: openai.OpenAI, **request: Any) -> openai.PermissionDeniedError:
    request = {"model": "gpt-4o-mini", "messages": HELLO, **request}
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(**request)
    error = caught.value
    assert error.status_code == 403 and error.code == "capability_denied"
    assert error.type == "permission_error"
    return error


# --- tools ----------------------------------------------------------------------------------


def test_offered_tool_outside_the_vcs_is_denied(client: openai.OpenAI) -> None:
    error = _denied(client, tools=[_tool("lookup_order"), _tool("delete_user")])
    assert "delete_user" in error.message and error.param == "tools"


def test_legacy_function_outside_the_vcs_is_denied(client: openai.OpenAI) -> None:
    _denied(client, functions=[_function("delete_user")])


def test_tool_choice_forcing_a_tool_outside_the_vcs_is_denied(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "delete_user"}}
    assert (
        "delete_user" in _denied(client, tools=[_tool("lookup_order")], tool_choice=choice).message
    )


def test_function_call_forcing_a_function_outside_the_vcs_is_denied(client: openai.OpenAI) -> None:
    error = _denied(
        client, functions=[_function("lookup_order")], function_call={"name": "delete_user"}
    )
    assert "delete_user" in error.message


def test_tool_names_are_compared_trimmed_and_case_insensitively(client: openai.OpenAI) -> None:
    _denied(client, tools=[_tool(" DELETE_User ")])
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, tools=[_tool(" Lookup_Order ")]
    )
    assert completion.choices[0].message.tool_calls is not None


def test_legacy_functions_in_the_vcs_are_allowed(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, functions=[_function("lookup_order")]
    )
    assert completion.choices[0].message.function_call is not None


@pytest.mark.parametrize(
    "request_",
    [
        {"tools": [{"type": "web_search"}]},
        {"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://example.com"}]},
        {"tools": [{"type": "code_interpreter"}]},
        {"tool_choice": {"type": "web_search"}},
        {"web_search_options": {}},
    ],
    ids=["web_search", "mcp", "code_interpreter", "tool_choice", "web_search_options"],
)
def test_builtin_tools_are_denied_unless_whitelisted(
    client: openai.OpenAI, request_: dict[str, Any]
) -> None:
    _denied(client, extra_body=request_)


def test_a_whitelisted_builtin_tool_is_allowed(gw: Gateway) -> None:
    client = sdk(gw, gw.token({**PLAN, "builtin_tools": ["web_search"]}))
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, extra_body={"tools": [{"type": "web_search"}]}
    )
    assert completion.choices[0].message.content
    _denied(client, extra_body={"tools": [{"type": "code_interpreter"}]})


# --- parameters -----------------------------------------------------------------------------


def test_max_tokens_above_the_cap_is_denied(client: openai.OpenAI) -> None:
    assert "max_tokens" in _denied(client, max_tokens=101).message
    _denied(client, max_completion_tokens=101)
    assert client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=100
    ).choices


def test_a_pinned_param_may_be_repeated_or_left_out_but_not_changed(client: openai.OpenAI) -> None:
    error = _denied(client, temperature=0.7)
    assert error.param == "temperature" and "pinned" in error.message
    assert client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, temperature=0
    ).choices
    assert client.chat.completions.create(model="gpt-4o-mini", messages=HELLO).choices


def test_n_above_max_n_is_denied(client: openai.OpenAI) -> None:
    _denied(client, n=3)
    assert (
        len(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, n=2).choices) == 2
    )


def test_logprobs_and_logit_bias_are_denied_unless_allowed(client: openai.OpenAI) -> None:
    _denied(client, logprobs=True)
    _denied(client, logprobs=True, top_logprobs=2)
    _denied(client, logit_bias={"50256": -100})
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", logprobs=0)
    assert client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, logprobs=False
    ).choices


def test_logprobs_are_allowed_where_the_plan_allows_them(gw: Gateway) -> None:
    plan = {
        **PLAN,
        "models": [
            {
                "name": "gpt-4o-mini",
                "max_tokens": 100,
                "allow_logprobs": True,
                "allow_logit_bias": True,
            }
        ],
    }
    client = sdk(gw, gw.token(plan))
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, logprobs=True, logit_bias={"50256": -100}
    )
    assert completion.choices


def test_a_model_outside_the_vcs_is_denied_and_an_unknown_one_is_404(client: openai.OpenAI) -> None:
    assert "gpt-4o" in _denied(client, model="gpt-4o").message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5-nonexistent", messages=HELLO)


@pytest.mark.parametrize(
    "extra",
    [
        {"api_base": "http://evil"},
        {"metadata": {"base_url": "http://evil"}},
        {"extra_body": {"api_base": "http://evil"}},
    ],
    ids=["api_base", "metadata.base_url", "extra_body.api_base"],
)
def test_upstream_override_fields_are_denied(client: openai.OpenAI, extra: dict[str, Any]) -> None:
    error = _denied(client, extra_body=extra)
    assert "evil" not in error.response.text  # values are never echoed


def test_denials_are_journaled_and_not_charged(
    gw: Gateway, client: openai.OpenAI, opened: dict[str, Any], redis_url: str
) -> None:
    _denied(client, tools=[_tool("delete_user")])
    _denied(client, max_tokens=1000)
    shown = gw.session(opened["session_id"])
    assert shown["requests"] == 0 and shown["spent_nanos"] == 0 and shown["reserved_nanos"] == 0
    denials = [e for e in journal(redis_url, opened["session_id"]) if e["kind"] == "denial"]
    assert [e["rule"] for e in denials] == ["tool_not_allowed", "max_tokens_cap"]
    assert all(e["status"] == "403" for e in denials)


def test_a_secret_in_a_refused_override_field_never_reaches_the_journal(
    client: openai.OpenAI, opened: dict[str, Any], redis_url: str
) -> None:
    secret = "sk-client-SECRET-0123456789"
    _denied(client, extra_body={"api_key": secret, "metadata": {"api_base": "http://evil", "note": "kept"}})
    raw = b"".join(v for _, f in redis.Redis.from_url(redis_url).xrange(f"journal:{{sess:{opened['session_id']}}}") for v in f.values())
    assert secret.encode() not in raw and b"http://evil" not in raw
    denial = [e for e in journal(redis_url, opened["session_id"]) if e["kind"] == "denial"][-1]
    assert denial["rule"] == "upstream_override" and b"kept" in raw


# --- tokens ---------------------------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(opened: dict[str, Any]) -> dict[str, Any]:
    payload = opened["token"].split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def _unauthenticated(gw: Gateway, token: str) -> openai.AuthenticationError:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gw, token).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == 401 and caught.value.type == "authentication_error"
    return caught.value


def test_a_missing_or_malformed_bearer_is_401(gw: Gateway) -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO}
    openai_error(httpx.post(gw.openai_base + "/chat/completions", json=body), 401)
    openai_error(
        httpx.post(
            gw.openai_base + "/chat/completions", json=body, headers={"Authorization": "Basic abc"}
        ),
        401,
    )
    _unauthenticated(gw, "not-a-token")


def test_a_tampered_token_is_401(gw: Gateway, opened: dict[str, Any]) -> None:
    header, payload, signature = opened["token"].split(".")
    other = gw.open_session(PLAN)
    claims = {**_claims(opened), "sub": other["session_id"]}
    _unauthenticated(gw, f"{header}.{_b64(claims)}.{signature}")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    _unauthenticated(gw, f"{header}.{payload}.{flipped}")
    _unauthenticated(gw, f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.")


def test_a_token_signed_with_another_key_is_401(
    gw: Gateway, opened: dict[str, Any], keyring: Keyring
) -> None:
    stranger = Keyring.from_sources("another-signing-secret-" + "z" * 32)
    token, _ = mint(
        stranger,
        session_id=opened["session_id"],
        assembly_id=opened["assembly_id"],
        tenant="acme",
        ttl_s=600,
    )
    _unauthenticated(gw, token)
    # Same kid, wrong secret: the signature check, not the kid lookup, refuses it.
    forged = jwt.encode(
        _claims(opened),
        "another-signing-secret-" + "z" * 32,
        algorithm="HS256",
        headers={"kid": keyring.active.kid},
    )
    _unauthenticated(gw, forged)
    assert SIGNING_SECRET not in forged


def test_an_expired_token_is_401(gw: Gateway, opened: dict[str, Any], keyring: Keyring) -> None:
    token, _ = mint(
        keyring,
        session_id=opened["session_id"],
        assembly_id=opened["assembly_id"],
        tenant="acme",
        ttl_s=60,
        now=time.time() - 3600,
    )
    assert "expired" in _unauthenticated(gw, token).message


def test_an_expired_session_is_401_even_within_token_leeway(gw: Gateway) -> None:
    opened = gw.open_session(PLAN, ttl_s=3)
    client = sdk(gw, opened["token"])
    assert client.chat.completions.create(model="gpt-4o-mini", messages=HELLO).choices
    time.sleep(3.2)
    _unauthenticated(gw, opened["token"])


def test_a_validly_signed_token_for_an_unknown_session_is_401(
    gw: Gateway, opened: dict[str, Any], keyring: Keyring
) -> None:
    token, _ = mint(
        keyring,
        session_id="sess_" + "0" * 24,
        assembly_id=opened["assembly_id"],
        tenant="acme",
        ttl_s=600,
    )
    _unauthenticated(gw, token)


def test_a_revoked_session_is_401_on_the_next_request(
    gw: Gateway, opened: dict[str, Any], client: openai.OpenAI
) -> None:
    assert client.chat.completions.create(model="gpt-4o-mini", messages=HELLO).choices
    revoked = gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    assert _unauthenticated(gw, opened["token"]).code == "session_revoked"
    with pytest.raises(openai.AuthenticationError):
        list(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert gw.session(opened["session_id"])["state"] == "revoked"


def test_a_revoked_session_cannot_list_models(
    gw: Gateway, opened: dict[str, Any], client: openai.OpenAI
) -> None:
    assert client.models.list().data
    gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/revoke")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_revoked_session_gets_401_before_any_policy_check(
    gw: Gateway, opened: dict[str, Any], client: openai.OpenAI, redis_url: str
) -> None:
    gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/revoke")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, tools=[_tool("delete_user")]
        )
    entries = journal(redis_url, opened["session_id"])
    assert [e["kind"] for e in entries] == ["state", "state", "denial"]
    assert (entries[-1]["status"], entries[-1]["code"]) == ("401", "session_revoked")


def test_sessions_are_isolated_from_each_other(gw: Gateway) -> None:
    first, second = gw.open_session(PLAN), gw.open_session(PLAN)
    for _ in range(2):
        sdk(gw, first["token"]).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    raw = sdk(gw, second["token"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO
    )
    assert raw.headers["x-abc-session"] == second["session_id"]
    a, b = gw.session(first["session_id"]), gw.session(second["session_id"])
    assert (a["requests"], b["requests"]) == (2, 1)
    assert a["spent_nanos"] > b["spent_nanos"] > 0
    # A VCS token opens nothing on the admin API, not even its own session.
    for session_id in (first["session_id"], second["session_id"]):
        response = httpx.get(
            f"{gw.base_url}/admin/v1/sessions/{session_id}", headers=bearer(first["token"])
        )
        openai_error(response, 401)
    gw.admin.post(f"/admin/v1/sessions/{first['session_id']}/revoke")
    _unauthenticated(gw, first["token"])
    assert (
        sdk(gw, second["token"])
        .chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        .choices
    )
