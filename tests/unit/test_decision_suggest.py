"""Suggestions from journals built entry by entry (no gateway): a tool every request
offering it was denied, MCP tool calls, and sessions that ran out of budget."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.assembly.compile import compile_plan
from gateway.assembly.plan import parse_plan
from gateway.decision.observe import SessionLog, walk
from gateway.decision.planfile import plan_from_assembly
from gateway.decision.suggest import suggest
from gateway.state.entries import Kind, make_entry
from tests.conftest import make_settings

PLAN: dict[str, Any] = {
    "name": "unit-bot",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 64}],
    "tools": [{"name": "lookup_order"}, {"name": "refund_order"}],
    "budget": {"usd": 0.001},
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
Raw = tuple[bytes, dict[bytes, bytes]]


def entry(kind: str, body: Any = None, **fields: Any) -> dict[bytes, bytes]:
    return dict(make_entry(kind, body=None if body is None else orjson.dumps(body), **fields).fields)


def offering(tool: str) -> dict[str, Any]:
    return {**CHAT, "tools": [{"type": "function", "function": {"name": tool}}]}


def answered(rid: str, cost: int, tools: tuple[str, ...] = ()) -> list[dict[bytes, bytes]]:
    calls = [{"id": "c", "type": "function", "function": {"name": t, "arguments": "{}"}} for t in tools]
    reply = {"choices": [{"message": {"role": "assistant", "content": "ok", "tool_calls": calls or None}}]}
    return [entry(Kind.REQUEST, offering(tools[0]) if tools else CHAT, rid=rid, model="gpt-4o-mini",
                  endpoint="chat/completions"),
            entry(Kind.RESPONSE, reply, rid=rid, tok_in=10, tok_out=4, cost_nanos=cost)]


def session(n: int, spend: int, mcp_calls: int, ran_out: bool) -> SessionLog:
    fields = [*answered(f"r{n}a", spend - 1000 * mcp_calls, ("lookup_order",))]
    fields.append(entry(Kind.DENIAL, offering("refund_order"), rid=f"r{n}d", code="plugin_denied", message="no refunds"))
    for i in range(mcp_calls):
        call = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "files__read", "arguments": {}}}
        fields += [entry(Kind.REQUEST, call, rid=f"r{n}m{i}", endpoint="mcp"),
                   entry(Kind.RESPONSE, {"result": {}}, rid=f"r{n}m{i}", cost_nanos=1000)]
    if ran_out:
        fields.append(entry(Kind.DENIAL, CHAT, rid=f"r{n}x", code="budget_exceeded",
                            message="budget exhausted: usd left 0.000000100; this request could cost more"))
    raw: list[Raw] = [(f"{i}-0".encode(), f) for i, f in enumerate(fields, 1)]
    return walk(SessionLog(f"sess_{n}", "asm", 1_000_000, None, None), raw)


def test_always_denied_tools_mcp_calls_and_sessions_that_ran_out_are_named_with_evidence() -> None:
    settings = make_settings()
    base = compile_plan(parse_plan(PLAN), settings).assembly
    logs = [session(1, 900_000, 2, False), session(2, 950_000, 1, False), session(3, 990_000, 0, True)]
    found = suggest(plan_from_assembly(base), base, logs, settings, {}).to_dict()
    changes = {c["kind"]: c for c in found["changes"]}

    refund = changes["tool_always_denied"]
    assert refund["path"] == "tools.refund_order" and refund["action"] == "review"
    assert refund["evidence"] == {"offered": 3, "denied": 3, "called": 0, "sessions": ["sess_1", "sess_2", "sess_3"]}
    assert "tool_never_called" not in changes and "tool_unused" not in changes  # lookup_order was called

    mcp = changes["mcp_tool"]
    assert mcp["after"] == {"max_calls": 3}  # p95 of [2, 1, 0] is 2, plus half
    assert mcp["evidence"]["calls"] == 3 and mcp["evidence"]["cost_per_call_nanos"] == 1000
    assert mcp["evidence"]["sessions"] == ["sess_1", "sess_2"]

    usd = changes["budget_usd"]
    assert (usd["before"], usd["after"]) == ("0.001000000", "0.010000000")  # 990,000 x 1.5, up to a cent
    assert usd["evidence"]["ran_out"] == ["sess_3"] and usd["evidence"]["p95"] == 990_000
    assert found["revised_plan"]["budget"]["usd"] == 0.01
    assert found["notes"] == ["gpt-4o-mini: 3 answer(s); caps and cheaper models need 5"]
