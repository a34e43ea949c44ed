"""MCP tools behind the gateway: a real MCP server process (the SDK's MCPServer on loopback)
and the SDK's own client talking to the gateway's /mcp with a session's VCS token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.capability import Keyring
from gateway.settings import Settings, ToolServerSettings
from tests.chromium import CHROMIUM, Chromium
from tests.conftest import (
    ADMIN_TOKEN,
    BOTH_REDIS,
    Gateway,
    assert_no_server_errors,
    make_settings,
    start_gateway,
)
from tests.fakes.mcp_proc import McpServerProcess
from tests.fakes.mcp_server import WEATHER
from tests.http.test_dashboard import fill_token_and_load
from tests.metrics_support import counter

T = TypeVar("T")
PRICE = 0.01  # USD per call


@pytest.fixture(scope="module")
def shop() -> Iterator[McpServerProcess]:
    server = McpServerProcess().start()
    yield server
    server.stop()


def _settings(*servers: McpServerProcess) -> Settings:
    # definitions_ttl_s 0: every call is checked against the server's current definitions.
    names = ["shop", "other"]
    return make_settings(tool_servers=[
        ToolServerSettings(name=names[i], url=s.url, definitions_ttl_s=0) for i, s in enumerate(servers)
    ])


@pytest.fixture
def mgw(shop: McpServerProcess, redis_url: str, keyring: Keyring) -> Iterator[Gateway]:
    shop.control("reset")
    gw = start_gateway(_settings(shop), redis_url, keyring)
    try:
        yield gw
        assert_no_server_errors(gw)
    finally:
        gw.close()


def plan(**extra: Any) -> dict[str, Any]:
    return {
        "name": "mcp-test",
        "tenant": "acme",
        "models": [{"name": "gpt-4o-mini", "max_tokens": 64}],
        "mcp": [{"server": "shop", "tools": ["get_order", "weather"], "price_per_call_usd": PRICE}],
        "budget": {"usd": 1.0},
        **extra,
    }


def with_client(gw: Gateway, token: str, work: Callable[[Client], Awaitable[T]]) -> T:
    async def run() -> T:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
        async with Client(streamable_http_client(gw.base_url + "/mcp", http_client=http)) as client:
            return await work(client)

    return asyncio.run(run())


def refusal(gw: Gateway, token: str, name: str, arguments: dict[str, Any]) -> MCPError:
    async def call(client: Client) -> MCPError:
        with pytest.raises(MCPError) as caught:
            await client.call_tool(name, arguments)
        return caught.value

    return with_client(gw, token, call)


def test_tools_list_shows_only_the_plan_tools_with_their_frozen_definitions(mgw: Gateway) -> None:
    token = mgw.token(plan())

    async def work(client: Client) -> Any:
        return (await client.list_tools()).tools

    tools = {t.name: t for t in with_client(mgw, token, work)}
    assert sorted(tools) == ["shop__get_order", "shop__weather"]  # echo is on the server, not in the plan
    assert tools["shop__weather"].description == WEATHER
    assert tools["shop__get_order"].input_schema["required"] == ["order_id"]
    assert tools["shop__get_order"].output_schema is not None


def test_an_allowed_call_reaches_the_server_with_the_bare_name_and_is_charged(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(plan())

    async def work(client: Client) -> Any:
        return await client.call_tool("shop__get_order", {"order_id": "A-1", "include_items": True})

    result = with_client(mgw, opened["token"], work)
    assert result.is_error is False
    assert result.structured_content == {"order_id": "A-1", "status": "shipped", "items": 3}
    assert shop.calls() == {"get_order": 1}
    shown = mgw.session(opened["session_id"])
    assert (shown["spent_usd"], shown["reserved_nanos"], shown["requests"]) == ("0.010000000", 0, 1)
    metrics = httpx.get(mgw.base_url + "/metrics").text
    assert counter(metrics, "abc_tool_calls_total", server="shop", tool="shop__get_order", outcome="ok") == 1
    assert counter(metrics, "abc_tool_cost_nanos_total", server="shop", tool="shop__get_order") == 10_000_000
    assert counter(metrics, "abc_cost_nanos_total", model="mcp:shop__get_order") == 10_000_000


VARIANTS = [
    "shop__echo",  # on the server, not in the plan
    "shop__Get_order",  # a case variant
    "SHOP__get_order",
    "shop__get_\u03bfrder",  # Greek omicron: a homoglyph
    "shop__get_order\u200b",  # a zero-width space
    " shop__get_order",
    "get_order",  # the bare upstream name
    "shop__shop__get_order",  # prefix games
    "__get_order",
    "other__get_order",
]


def refusals(gw: Gateway, token: str, calls: list[tuple[str, dict[str, Any]]]) -> list[MCPError]:
    async def work(client: Client) -> list[MCPError]:
        errors = []
        for name, arguments in calls:
            with pytest.raises(MCPError) as caught:
                await client.call_tool(name, arguments)
            errors.append(caught.value)
        return errors

    return with_client(gw, token, work)


def test_names_outside_the_vcs_are_denied_exactly_as_sent(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(plan())
    errors = refusals(mgw, opened["token"], [(name, {"order_id": "A-1", "text": "x"}) for name in VARIANTS])
    assert [e.error.data["code"] if e.error.data else None for e in errors] == ["capability_denied"] * len(VARIANTS)
    assert shop.calls() == {}
    assert mgw.session(opened["session_id"])["spent_nanos"] == 0


def test_arguments_that_break_the_frozen_schema_never_reach_the_server(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(plan())
    bad = [{}, {"order_id": 42}, {"order_id": "A-1", "include_items": "yes"}]
    errors = refusals(mgw, opened["token"], [("shop__get_order", arguments) for arguments in bad])
    assert [e.error.code for e in errors] == [-32602] * 3
    assert [e.error.data["code"] if e.error.data else None for e in errors] == ["invalid_arguments"] * 3
    assert shop.calls() == {}
    entries = mgw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"]
    assert [e["code"] for e in entries if e["kind"] == "denial"] == ["invalid_arguments"] * 3


STEPPED = plan(steps=[
    {"id": "triage", "model": "gpt-4o-mini", "next": ["lookup"]},
    {"id": "lookup", "tools": ["shop__get_order"], "next": ["answer"]},
    {"id": "answer", "model": "gpt-4o-mini", "next": []},
])


def _chat(gw: Gateway, token: str) -> None:
    client = openai.OpenAI(base_url=gw.openai_base, api_key=token, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "where is A-1?"}])


def test_step_order_holds_for_tool_calls_and_the_journal_interleaves_them(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(STEPPED)
    token, session_id = opened["token"], opened["session_id"]

    early = refusal(mgw, token, "shop__get_order", {"order_id": "A-1"})
    assert early.error.data is not None and early.error.data["code"] == "step_not_allowed"
    assert early.error.data["allowed_steps"] == ["triage"]
    _chat(mgw, token)

    async def twice(client: Client) -> MCPError:
        assert (await client.call_tool("shop__get_order", {"order_id": "A-1"})).is_error is False
        with pytest.raises(MCPError) as again:
            await client.call_tool("shop__get_order", {"order_id": "A-1"})
        return again.value

    again = with_client(mgw, token, twice)
    assert again.error.data is not None and again.error.data["code"] == "step_not_allowed"
    _chat(mgw, token)
    assert mgw.session(session_id)["current_step"] == "answer"
    assert shop.calls() == {"get_order": 1}

    entries = mgw.admin.get(f"/admin/v1/sessions/{session_id}/journal").json()["entries"]
    calls = [(e["kind"], e.get("endpoint") or e.get("tool")) for e in entries if e["kind"] in ("request", "response")]
    assert calls == [
        ("request", "chat/completions"), ("response", None),
        ("request", "mcp/tools/call"), ("response", "shop__get_order"),
        ("request", "chat/completions"), ("response", None),
    ]
    verify = mgw.admin.post(f"/admin/v1/sessions/{session_id}/replay", json={"mode": "verify"}).json()
    assert verify["integrity"] == "ok" and verify["entries"] == len(entries)


@BOTH_REDIS  # also on a Redis Cluster
def test_max_calls_is_enforced_per_entry_and_session(mgw: Gateway, shop: McpServerProcess) -> None:
    capped = plan(mcp=[{"server": "shop", "tools": ["get_order", "weather"], "price_per_call_usd": PRICE, "max_calls": 2}])
    token = mgw.token(capped)

    async def work(client: Client) -> MCPError:
        await client.call_tool("shop__get_order", {"order_id": "A-1"})
        await client.call_tool("shop__weather", {"city": "Oslo"})
        with pytest.raises(MCPError) as third:
            await client.call_tool("shop__get_order", {"order_id": "A-2"})
        return third.value

    error = with_client(mgw, token, work)
    assert error.error.data is not None
    assert (error.error.data["code"], error.error.data["budget"]) == ("budget_exceeded", "max_calls")
    assert shop.calls() == {"get_order": 1, "weather": 1}


def test_concurrent_calls_through_two_replicas_never_pass_max_calls_or_the_budget(
    mgw: Gateway, shop: McpServerProcess, redis_url: str, keyring: Keyring,
) -> None:
    other = start_gateway(_settings(shop), redis_url, keyring)  # a second replica, the same Redis
    try:
        capped = mgw.open_session(plan(mcp=[{"server": "shop", "tools": ["get_order"], "price_per_call_usd": PRICE, "max_calls": 5}]))
        priced = mgw.open_session(plan(mcp=[{"server": "shop", "tools": ["weather"], "price_per_call_usd": PRICE}]), budget_usd=0.035)

        async def one(gw: Gateway, token: str, name: str, arguments: dict[str, Any]) -> str:
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
            async with Client(streamable_http_client(gw.base_url + "/mcp", http_client=http)) as client:
                try:
                    await client.call_tool(name, arguments)
                    return "ok"
                except MCPError as refused:
                    return refused.error.data["code"] if refused.error.data else "no code"

        async def burst() -> list[str]:
            calls = [
                one(gw, opened["token"], name, arguments)
                for gw in (mgw, other) for _ in range(8)
                for opened, name, arguments in ((capped, "shop__get_order", {"order_id": "A-1"}), (priced, "shop__weather", {"city": "Oslo"}))
            ]
            return await asyncio.gather(*calls)

        outcomes = asyncio.run(burst())
        assert sorted(set(outcomes)) == ["budget_exceeded", "ok"], outcomes
        assert shop.calls() == {"get_order": 5, "weather": 3}  # max_calls 5; $0.035 at $0.01 a call
        assert outcomes.count("ok") == 8
        for opened, calls in ((capped, 5), (priced, 3)):
            shown = mgw.session(opened["session_id"])
            assert (shown["spent_nanos"], shown["reserved_nanos"]) == (calls * 10_000_000, 0)
            entries = mgw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"]
            assert sum(1 for e in entries if e["kind"] == "response") == calls
            assert mgw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/replay", json={"mode": "verify"}).json()["integrity"] == "ok"
        assert_no_server_errors(other)
    finally:
        other.close()


def test_an_exhausted_budget_refuses_the_call_before_the_server(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(plan(), budget_usd=0.015)

    async def work(client: Client) -> MCPError:
        await client.call_tool("shop__weather", {"city": "Oslo"})
        with pytest.raises(MCPError) as second:
            await client.call_tool("shop__weather", {"city": "Oslo"})
        return second.value

    error = with_client(mgw, opened["token"], work)
    assert error.error.data is not None and error.error.data["code"] == "budget_exceeded"
    assert shop.calls() == {"weather": 1}
    assert mgw.session(opened["session_id"])["spent_usd"] == "0.010000000"


def test_a_tool_failure_is_a_result_journaled_and_charged(mgw: Gateway, shop: McpServerProcess) -> None:
    with_echo = plan(mcp=[{"server": "shop", "tools": ["echo"], "price_per_call_usd": PRICE}])
    opened = mgw.open_session(with_echo)

    async def work(client: Client) -> Any:
        return await client.call_tool("shop__echo", {"text": "fail"})

    result = with_client(mgw, opened["token"], work)
    assert result.is_error is True
    assert mgw.session(opened["session_id"])["spent_usd"] == "0.010000000"
    entries = mgw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"]
    assert entries[-1]["kind"] == "response" and entries[-1]["is_error"] is True


def test_plan_plugins_rewrite_or_refuse_a_tool_result_before_the_client_sees_it(mgw: Gateway, shop: McpServerProcess) -> None:
    guarded = plan(
        mcp=[{"server": "shop", "tools": ["get_order", "echo"], "price_per_call_usd": PRICE}],
        plugins=[{"name": "pii_redact", "options": {"answers": True}}, {"name": "output_limits", "options": {"max_chars": 100}}],
    )
    opened = mgw.open_session(guarded)

    async def work(client: Client) -> tuple[Any, Any, MCPError]:
        echoed = await client.call_tool("shop__echo", {"text": "mail jane@example.com"})
        order = await client.call_tool("shop__get_order", {"order_id": "jane@example.com"})
        with pytest.raises(MCPError) as too_long:
            await client.call_tool("shop__echo", {"text": "x" * 101})
        return echoed, order, too_long.value

    echoed, order, refused = with_client(mgw, opened["token"], work)
    assert [block.text for block in echoed.content] == ["mail [email]"]
    assert echoed.structured_content == {"result": "mail [email]"}
    # Structured content is read by the plugins too, then checked against the frozen output schema.
    assert order.structured_content == {"order_id": "[email]", "status": "shipped", "items": 0}
    assert "jane@" not in str(order.content)
    assert refused.error.data is not None and refused.error.data["code"] == "plugin_denied"
    assert shop.calls() == {"echo": 2, "get_order": 1}  # the refused result was made: it is charged

    entries = mgw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"]
    answered = [e for e in entries if e["kind"] == "response"]
    # Each result carries the address twice: in its text block and in its structured content.
    assert [e["plugins"] for e in answered] == [{"pii_redact": {"answer_email": 2}}] * 2
    assert all("jane@" not in str(e["body"]) for e in answered)  # the journal keeps what was sent
    assert (entries[-1]["kind"], entries[-1]["code"], entries[-1]["cost_nanos"]) == ("error", "plugin_denied", 10_000_000)
    assert mgw.session(opened["session_id"])["spent_usd"] == "0.030000000"


def test_a_rug_pull_is_refused_and_recompiling_warns_and_changes_the_id(mgw: Gateway, shop: McpServerProcess) -> None:
    first = mgw.compile(plan())
    opened = mgw.open_session(first)
    shop.control("rugpull")

    error = refusal(mgw, opened["token"], "shop__weather", {"city": "Oslo"})
    assert error.error.data is not None and error.error.data["code"] == "tool_changed"
    assert shop.calls() == {}
    shown = mgw.session(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"]) == (0, 0)

    recompiled = mgw.admin.post("/admin/v1/plans/compile", json=plan()).json()
    assert recompiled["assembly_id"] != first
    warned = [w for w in recompiled["warnings"] if "shop__weather" in w]
    assert any("hidden instruction block" in w for w in warned)
    assert any("secrets or key files" in w for w in warned)


def test_a_rug_pull_between_two_calls_is_refused_on_the_second(mgw: Gateway, shop: McpServerProcess) -> None:
    token = mgw.token(plan())

    async def call(client: Client) -> Any:
        return await client.call_tool("shop__weather", {"city": "Oslo"})

    assert with_client(mgw, token, call).is_error is False  # the server's listing, read and remembered
    shop.control("rugpull")
    error = refusal(mgw, token, "shop__weather", {"city": "Oslo"})
    assert error.error.data is not None and error.error.data["code"] == "tool_changed"
    assert shop.calls() == {"weather": 1}


def test_an_unreachable_server_is_a_clear_error_and_releases_the_reservation(
    mgw: Gateway, redis_url: str, keyring: Keyring
) -> None:
    assembly_id = mgw.compile(plan())  # while the server is up
    # Another replica, on the same Redis, whose "shop" has gone away: nothing listens there.
    down = start_gateway(_settings(McpServerProcess()), redis_url, keyring)
    try:
        opened = down.open_session(assembly_id)
        error = refusal(down, opened["token"], "shop__get_order", {"order_id": "A-1"})
        assert error.error.data is not None and error.error.data["code"] == "upstream_error"
        assert "tool server 'shop'" in error.error.message and "127.0.0.1" not in error.error.message
        shown = down.session(opened["session_id"])
        assert (shown["spent_nanos"], shown["reserved_nanos"]) == (0, 0)
        entries = down.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"]
        assert (entries[-1]["kind"], entries[-1]["code"], entries[-1]["cost_nanos"]) == ("error", "upstream_error", 0)
        assert_no_server_errors(down)
    finally:
        down.close()


def test_a_tool_that_does_not_answer_in_time_is_a_timeout_charged_nothing(
    shop: McpServerProcess, redis_url: str, keyring: Keyring,
) -> None:
    shop.control("reset")
    settings = make_settings(tool_servers=[ToolServerSettings(name="shop", url=shop.url, timeout_s=1)])
    gw = start_gateway(settings, redis_url, keyring)
    try:
        opened = gw.open_session(plan(mcp=[{"server": "shop", "tools": ["echo"], "price_per_call_usd": PRICE}]))

        async def work(client: Client) -> tuple[MCPError, Any]:
            with pytest.raises(MCPError) as hung:
                await client.call_tool("shop__echo", {"text": "hang"})
            return hung.value, await client.call_tool("shop__echo", {"text": "after"})

        started = time.monotonic()
        hung, after = with_client(gw, opened["token"], work)
        assert time.monotonic() - started < 10  # the hang lasts 30 s: the gateway gave up at 1 s
        assert hung.error.data is not None and hung.error.data["code"] == "upstream_timeout"
        assert "tool server 'shop'" in hung.error.message and "127.0.0.1" not in hung.error.message
        assert after.is_error is False  # the server's next answer is read, on a new connection
        shown = gw.session(opened["session_id"])
        assert (shown["spent_nanos"], shown["reserved_nanos"]) == (10_000_000, 0)  # the answered call only
        entries = gw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"]
        assert [(e["kind"], e.get("code"), e.get("cost_nanos")) for e in entries if e["kind"] in ("error", "response")] == [
            ("error", "upstream_timeout", 0), ("response", None, 10_000_000),
        ]
        assert_no_server_errors(gw)
    finally:
        gw.close()


def test_a_call_its_client_cancels_is_stopped_passed_on_upstream_and_charged_nothing(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(plan(mcp=[{"server": "shop", "tools": ["echo"], "price_per_call_usd": PRICE}]))

    async def work(client: Client) -> tuple[BaseException, Any]:
        # The SDK's client gives up after 1 s and sends notifications/cancelled for the call.
        with pytest.raises(Exception) as gave_up:  # noqa: PT011  # whatever the SDK raises on its timeout
            await client.call_tool("shop__echo", {"text": "hang"}, read_timeout_seconds=1)
        return gave_up.value, await client.call_tool("shop__echo", {"text": "after"})

    started = time.monotonic()
    _, after = with_client(mgw, opened["token"], work)
    assert time.monotonic() - started < 10 and after.is_error is False
    deadline = time.monotonic() + 10
    while shop.calls().get("echo_cancelled") != 1:  # the server heard of it too, and stopped
        assert time.monotonic() < deadline, shop.calls()
        time.sleep(0.05)
    shown = mgw.session(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"]) == (10_000_000, 0)  # the answered call only
    entries = mgw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"]
    assert [(e["kind"], e.get("code"), e.get("cost_nanos")) for e in entries if e["kind"] in ("error", "response")] == [
        ("error", "cancelled", 0), ("response", None, 10_000_000),
    ]


def test_a_cancelled_post_is_answered_with_its_refusal(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(plan(mcp=[{"server": "shop", "tools": ["echo"], "price_per_call_usd": PRICE}]))
    headers = {"Authorization": f"Bearer {opened['token']}", "Accept": "application/json"}
    hang = {"jsonrpc": "2.0", "id": "call-1", "method": "tools/call", "params": {"name": "shop__echo", "arguments": {"text": "hang"}}}

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=mgw.base_url, headers=headers, timeout=30) as http:
            pending = asyncio.ensure_future(http.post("/mcp", json=hang))
            while shop.calls().get("echo", 0) < 1:  # the call reached the server
                await asyncio.sleep(0.05)
            other = await http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "call-1"}}
            notified = await http.post("/mcp", json=cancel)
            return other, notified, await pending

    other, notified, answered = asyncio.run(run())
    assert (other.status_code, notified.status_code) == (202, 202)  # id 1 is not "call-1": nothing else stopped
    body = answered.json()
    assert answered.status_code == 200 and body["id"] == "call-1"
    assert body["error"]["data"]["code"] == "cancelled" and body["error"]["message"] == "request cancelled by the client"
    assert mgw.session(opened["session_id"])["reserved_nanos"] == 0
    assert_no_server_errors(mgw)


def test_a_restarted_server_is_reached_on_a_new_session_and_no_call_is_left_reserved(redis_url: str, keyring: Keyring) -> None:
    server = McpServerProcess().start()
    gw = start_gateway(_settings(server), redis_url, keyring)
    try:
        opened = gw.open_session(plan())

        async def call(client: Client) -> Any:
            return (await client.call_tool("shop__weather", {"city": "Oslo"})).content

        async def first_after_restart(client: Client) -> None:
            with contextlib.suppress(MCPError):  # the call that finds the session gone may fail: upstream_error
                await call(client)

        assert with_client(gw, opened["token"], call)[0].text == "Sunny in Oslo"
        server.stop()
        server.start()  # the same port; this process never saw the gateway's MCP session
        with_client(gw, opened["token"], first_after_restart)
        assert with_client(gw, opened["token"], call)[0].text == "Sunny in Oslo"
        assert server.calls()["weather"] in (1, 2)
        assert gw.session(opened["session_id"])["reserved_nanos"] == 0
        assert_no_server_errors(gw)
    finally:
        gw.close()
        server.stop()


def test_compiling_names_the_path_of_an_unknown_tool_or_an_unreachable_server(
    shop: McpServerProcess, redis_url: str, keyring: Keyring
) -> None:
    dead = McpServerProcess()  # never started: nothing listens on its port
    gw = start_gateway(_settings(shop, dead), redis_url, keyring)
    try:
        bad = plan(mcp=[
            {"server": "shop", "tools": ["get_order", "delete_everything"], "price_per_call_usd": PRICE},
            {"server": "other", "tools": ["x"], "price_per_call_usd": PRICE},
            {"server": "nope", "tools": ["x"], "price_per_call_usd": PRICE},
        ])
        response = gw.admin.post("/admin/v1/plans/compile", json=bad)
        assert response.status_code == 422
        paths = {p["path"]: p["message"] for p in response.json()["error"]["problems"]}
        assert set(paths) == {"mcp.0.tools.1", "mcp.1.server", "mcp.2.server"}
        assert "unreachable" in paths["mcp.1.server"] and "unknown tool server" in paths["mcp.2.server"]
    finally:
        gw.close()


def test_a_bad_token_is_http_401_before_any_json_rpc(mgw: Gateway) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        response = httpx.post(mgw.base_url + "/mcp", json=body, headers=headers)
        assert response.status_code == 401
        assert "jsonrpc" not in response.json()


def test_a_browser_page_of_a_foreign_origin_is_refused_403_and_journaled(
    shop: McpServerProcess, redis_url: str, keyring: Keyring,
) -> None:
    shop.control("reset")
    settings = make_settings(tool_servers=[ToolServerSettings(name="shop", url=shop.url)])
    settings = settings.model_copy(update={"server": settings.server.model_copy(update={"mcp_allowed_origins": ["https://app.example.com"]})})
    gw = start_gateway(settings, redis_url, keyring)
    try:
        opened = gw.open_session(plan())
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "shop__weather", "arguments": {"city": "Oslo"}}}

        def post(origin: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {opened['token']}", "Accept": "application/json"}
            return httpx.post(gw.base_url + "/mcp", json=call, headers=headers if origin is None else {**headers, "Origin": origin})

        # A page of a rebound name (its requests reach 127.0.0.1, its Origin still names it).
        for origin in ("http://evil.example", "http://localhost.evil.example:8080", "null", "https://app.example.com.evil.example"):
            refused = post(origin)
            assert refused.status_code == 403, (origin, refused.text)
            assert refused.json()["error"]["data"]["code"] == "origin_not_allowed" and refused.json()["id"] is None
        assert shop.calls() == {}
        # No Origin (an SDK, an agent), a loopback page, and the listed origin are served.
        for origin in (None, "http://localhost:6274", "http://127.0.0.1:3000", "https://APP.example.com:443"):
            served = post(origin)
            assert served.status_code == 200 and "result" in served.json(), (origin, served.text)
        assert shop.calls() == {"weather": 4}
        entries = gw.admin.get(f"/admin/v1/sessions/{opened['session_id']}/journal").json()["entries"]
        assert [e["code"] for e in entries if e["kind"] == "denial"] == ["origin_not_allowed"] * 4
        assert gw.session(opened["session_id"])["spent_nanos"] == 4 * 10_000_000
        assert_no_server_errors(gw)
    finally:
        gw.close()


def test_answers_are_one_json_body_on_a_kept_connection_unless_the_client_prefers_sse(mgw: Gateway) -> None:
    token = mgw.token(plan())
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    with httpx.Client(base_url=mgw.base_url, headers=headers) as http:
        first = http.post("/mcp", json=body)
        second = http.post("/mcp", json=body)
    assert first.headers["content-type"].startswith("application/json")
    assert first.json()["id"] == 7 and len(first.json()["result"]["tools"]) == 2
    assert second.extensions["network_stream"] is first.extensions["network_stream"]  # the same connection
    only_events = httpx.post(mgw.base_url + "/mcp", json=body, headers={**headers, "Accept": "text/event-stream"})
    assert only_events.headers["content-type"].startswith("text/event-stream")
    event, data = only_events.text.rstrip("\n").split("\n")
    assert event == "event: message" and json.loads(data.removeprefix("data: "))["result"] == first.json()["result"]
    sse_first = httpx.post(mgw.base_url + "/mcp", json=body, headers={**headers, "Accept": "text/event-stream, application/json"})
    assert sse_first.headers["content-type"].startswith("text/event-stream")


def test_resources_and_prompts_are_not_served(mgw: Gateway) -> None:
    token = mgw.token(plan())

    async def work(client: Client) -> MCPError:
        with pytest.raises(MCPError) as caught:
            await client.list_resources()
        return caught.value

    error = with_client(mgw, token, work)
    assert error.error.data is not None and error.error.data["code"] == "capability_denied"


def test_a_recorded_replay_answers_tool_calls_from_the_journal(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(plan(mcp=[{"server": "shop", "tools": ["get_order", "echo"], "price_per_call_usd": PRICE}]))

    async def session(client: Client) -> list[Any]:
        return [
            (await client.call_tool("shop__get_order", {"order_id": "A-7"})).model_dump(),
            (await client.call_tool("shop__echo", {"text": "fail"})).model_dump(),
        ]

    original = with_client(mgw, opened["token"], session)
    _chat(mgw, opened["token"])
    assert shop.calls() == {"get_order": 1, "echo": 1}

    replay = mgw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/replay", json={"mode": "recorded"}).json()
    assert with_client(mgw, replay["token"], session) == original
    _chat(mgw, replay["token"])
    assert shop.calls() == {"get_order": 1, "echo": 1}  # the server was not asked again

    diverged = refusal(mgw, replay["token"], "shop__get_order", {"order_id": "A-8"})
    assert diverged.error.data is not None and diverged.error.data["code"] == "replay_divergence"


@BOTH_REDIS  # also on a Redis Cluster
def test_a_live_replay_calls_the_tools_again_and_costs_show_tool_spend(mgw: Gateway, shop: McpServerProcess) -> None:
    opened = mgw.open_session(plan(mcp=[{"server": "shop", "tools": ["get_order", "echo"], "price_per_call_usd": PRICE}]))

    async def session(client: Client) -> None:
        await client.call_tool("shop__get_order", {"order_id": "A-7"})
        await client.call_tool("shop__echo", {"text": "fail"})

    with_client(mgw, opened["token"], session)
    _chat(mgw, opened["token"])

    live = mgw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/replay", json={"mode": "live"}).json()
    assert [(r["answer"], r["match"]) for r in live["results"]] == [("response", True)] * 3
    assert shop.calls() == {"get_order": 2, "echo": 2}

    by_tool = mgw.admin.get("/admin/v1/costs", params={"group_by": "tool"}).json()
    assert {r["key"]: r["cost_usd"] for r in by_tool["rows"]} == {"shop__get_order": "0.020000000", "shop__echo": "0.020000000"}
    by_server = mgw.admin.get("/admin/v1/costs", params={"group_by": "tool_server"}).json()
    assert {r["key"]: r["cost_usd"] for r in by_server["rows"]} == {"shop": "0.040000000"}
    by_model = mgw.admin.get("/admin/v1/costs", params={"group_by": "model"}).json()
    assert {"mcp:shop__get_order", "mcp:shop__echo", "gpt-4o-mini"} <= {r["key"] for r in by_model["rows"]}


TOOL_ROWS = """[...document.querySelectorAll('#tools tbody tr')].map((tr) =>
  [tr.dataset.server, tr.dataset.tool, tr.querySelector('.usd').textContent])"""


def test_the_dashboard_shows_tool_spend_by_server_and_tool(mgw: Gateway, shop: McpServerProcess, tmp_path: Path) -> None:
    opened = mgw.open_session(plan(mcp=[{"server": "shop", "tools": ["get_order", "echo"], "price_per_call_usd": PRICE}]))

    async def session(client: Client) -> None:
        for order in ("A-1", "A-2"):
            await client.call_tool("shop__get_order", {"order_id": order})
        await client.call_tool("shop__echo", {"text": "fail"})  # the tool's own failure: charged too

    with_client(mgw, opened["token"], session)
    _chat(mgw, opened["token"])  # model spend is not tool spend

    panels = mgw.admin.get("/admin/v1/dashboard").json()
    assert sorted((t["server"], t["tool"], t["cost_usd"]) for t in panels["tools"]) == [
        ("shop", "echo", "0.010000000"), ("shop", "get_order", "0.020000000"),
    ]
    if not CHROMIUM.exists():
        return  # the API is checked; the page's drawing of it is tests/http/test_dashboard_panels.py's

    async def drawn() -> Any:
        async with Chromium(tmp_path) as page:
            await page.navigate(mgw.base_url + "/admin/dashboard")
            await fill_token_and_load(page, ADMIN_TOKEN)
            await page.wait_for("document.getElementById('status').dataset.state === 'loaded'")
            return await page.evaluate(TOOL_ROWS)

    assert sorted(map(tuple, asyncio.run(drawn()))) == [("shop", "echo", "0.010000000"), ("shop", "get_order", "0.020000000")]


def test_a_model_may_be_offered_the_sessions_mcp_tools_as_functions(mgw: Gateway) -> None:
    token = mgw.token(plan(tools=[]))
    client = openai.OpenAI(base_url=mgw.openai_base, api_key=token, max_retries=0)
    offered = {"type": "function", "function": {"name": "shop__get_order", "parameters": {"type": "object"}}}
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "where is A-1?"}], tools=[offered],  # type: ignore[list-item]
    )
    assert answer.choices
    unknown = {"type": "function", "function": {"name": "shop__echo", "parameters": {"type": "object"}}}
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], tools=[unknown],  # type: ignore[list-item]
        )


def _children_running(module: str) -> list[int]:
    """Our child processes whose command line names `module`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if state != "Z" and int(ppid) == os.getpid() and module.encode() in cmdline:
            found.append(int(entry))
    return found


def test_a_stdio_server_is_started_by_the_gateway_and_restarted_when_it_dies(redis_url: str, keyring: Keyring) -> None:
    stdio = ToolServerSettings(name="shop", command=[sys.executable, "-m", "gateway.mcp.demo_server"])
    gw = start_gateway(make_settings(tool_servers=[stdio]), redis_url, keyring)
    try:
        token = gw.token(plan(mcp=[{"server": "shop", "tools": ["lookup_order"], "price_per_call_usd": PRICE}]))

        async def call(client: Client) -> Any:
            return (await client.call_tool("shop__lookup_order", {"order_id": "A-1234"})).structured_content

        async def first_after_death(client: Client) -> None:
            with contextlib.suppress(MCPError):  # the call that finds it dead may fail: upstream_error
                await call(client)

        assert with_client(gw, token, call)["status"] == "shipped"
        (child,) = _children_running("gateway.mcp.demo_server")
        os.kill(child, signal.SIGKILL)
        with_client(gw, token, first_after_death)
        assert with_client(gw, token, call)["status"] == "shipped"
        assert _children_running("gateway.mcp.demo_server") not in ([], [child])
        assert_no_server_errors(gw)
    finally:
        gw.close()
    deadline = time.monotonic() + 15  # stopped with the gateway (the SDK gives it a grace period)
    while _children_running("gateway.mcp.demo_server") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _children_running("gateway.mcp.demo_server") == []
