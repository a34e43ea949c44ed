"""The MCP part of `abc-gateway demo`: one tool server (a stdio child), one tool call.

Compiles a plan granting `lookup_order` from the demo's MCP server, opens a session, and
drives the gateway's /mcp with the official MCP SDK's client: list, call, a denied variant.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx

from gateway.settings import Settings, ToolServerSettings

TOOLS_PLAN: dict[str, Any] = {
    "name": "support-tools",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 256}],
    "mcp": [{"server": "shop", "tools": ["lookup_order"], "price_per_call_usd": 0.001, "max_calls": 5}],
    "budget": {"usd": 0.10},
    "steps": [
        {"id": "lookup", "tools": ["shop__lookup_order"], "next": ["answer"]},
        {"id": "answer", "model": "gpt-4o-mini", "next": []},
    ],
}


def with_demo_tool_server(settings: Settings) -> Settings:
    """The settings plus the demo's stdio MCP server, unless a `shop` server is configured."""
    if settings.tool_server("shop") is not None:
        return settings
    shop = ToolServerSettings(name="shop", command=[sys.executable, "-m", "gateway.mcp.demo_server"])
    return settings.model_copy(update={"tool_servers": [*settings.tool_servers, shop]})


def drive_tools(base_url: str, admin: httpx.Client, say: Any) -> str:
    """Returns the session id, for the journal excerpt."""
    compiled = admin.post("/admin/v1/plans/compile", json=TOOLS_PLAN).raise_for_status().json()
    say(f"compiled an MCP plan -> {compiled['assembly_id']}",
        "  shop__lookup_order frozen: description, schemas and hash from the server's tools/list")
    opened = admin.post("/admin/v1/sessions", json={"assembly_id": compiled["assembly_id"]}).raise_for_status().json()
    listed, result, denied = asyncio.run(_use(base_url + "/mcp", opened["token"]))
    say("MCP tools/list through the gateway (the SDK's client, the VCS token as Bearer)", f"  {listed}")
    say("MCP tools/call shop__lookup_order", f"  {result}")
    say("denied: a case variant of the tool's name", f"  {denied}")
    shown = admin.get(f"/admin/v1/sessions/{opened['session_id']}").raise_for_status().json()
    say("tool session", f"  spent ${shown['spent_usd']} (the frozen price per call), step {shown['current_step']}")
    session_id: str = opened["session_id"]
    return session_id


async def _use(url: str, token: str) -> tuple[list[str], Any, str]:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
        listed = [tool.name for tool in (await client.list_tools()).tools]
        result = (await client.call_tool("shop__lookup_order", {"order_id": "A-1234"})).structured_content
        try:
            await client.call_tool("shop__Lookup_Order", {"order_id": "A-1234"})
            denied = "allowed?!"
        except MCPError as exc:
            data = exc.error.data if isinstance(exc.error.data, dict) else {}
            denied = f"JSON-RPC error {exc.error.code} ({data.get('code')}): {exc.error.message}"
    return listed, result, denied
