"""The tools/call lifecycle: one MCP tool call on the same rails as a model call.

authorize (exact name, step, arguments vs the frozen schema; a denial is journaled)
-> reserve the frozen per-call price and journal the request (one round trip; max_calls
counted there) -> rug-pull check (the server's current definition vs the frozen hash)
-> the upstream, with the gateway's credentials and the bare tool name (a recorded replay
answers from the source journal instead) -> check the result -> settle, journal, advance.
A tool's own failure (isError) is a result: journaled and charged. Settlement runs
shielded, so a client that hangs up can't skip it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.assembly.model import Assembly
from gateway.capability import Claims
from gateway.deps import Deps
from gateway.errors import GatewayError, StateConflict, Unauthenticated, UpstreamError
from gateway.journal.recorded import recorded_provider
from gateway.mcp.policy import ToolGrant, authorize_tool, check_result
from gateway.mcp.upstream import ToolServer
from gateway.money import nanos_to_usd_str
from gateway.pipeline.exchange import as_gateway_error, require_live_session, shielded
from gateway.providers.base import Endpoint
from gateway.state.entries import Kind, make_entry
from gateway.state.ledger import Admission, CostTags

__all__ = ["ENDPOINT", "ToolAnswer", "ToolCall", "call_tool", "cost_tag"]

ENDPOINT = "mcp/tools/call"  # the journal's `endpoint` of a tool call


def cost_tag(qualified: str) -> str:
    """The cost rollups' `model` dimension for a tool: reports tell tools from models by it."""
    return "mcp:" + qualified


@dataclass(slots=True)
class ToolCall:
    request_id: str
    params: dict[str, Any]  # tools/call params as sent, `_meta` aside
    claims: Claims
    started: float = field(default_factory=time.perf_counter)
    raw: bytes = field(init=False)
    request_hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.raw = orjson.dumps(self.params)
        self.request_hash = hashlib.sha256(orjson.dumps(self.params, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolAnswer:
    body: bytes  # the CallToolResult's JSON
    cost_nanos: int
    budget_left_nanos: int  # -1: no usd budget


@dataclass(slots=True)
class _Admitted:
    call: ToolCall
    assembly: Assembly
    grant: ToolGrant
    admission: Admission
    upstream_s: float = 0.0


async def call_tool(deps: Deps, call: ToolCall) -> ToolAnswer:
    assembly = await deps.assemblies.get(call.claims.assembly_id)
    grant = await _authorize(deps, call, assembly)
    adm = _Admitted(call, assembly, grant, await _reserve(deps, call, assembly, grant))
    charged = 0
    try:
        if call.claims.replay_of is not None:
            body = await _recorded(deps, adm)
            result = orjson.loads(body)
        else:
            server = _server(deps, grant)
            result = await _upstream(server, adm)
            charged = grant.tool.price_nanos  # the server did the work, whatever it answered
            body = check_result(grant.tool, result, server.settings.max_result_bytes)
    except BaseException as exc:
        # Whatever ended it (a refusal, a bug, a client gone): settled once, as the Exchange does.
        await shielded(deps, _fail(deps, adm, as_gateway_error(exc), charged))
        raise
    return await shielded(deps, _settle(deps, adm, body, is_error=result.get("isError") is True))


async def _authorize(deps: Deps, call: ToolCall, assembly: Assembly) -> ToolGrant:
    try:
        return authorize_tool(assembly, call.params)
    except GatewayError as exc:
        denial: GatewayError = exc
        try:
            await require_live_session(deps, call.claims.session_id)
        except Unauthenticated as dead:
            denial = dead
        await _journal_denial(deps, call, assembly, denial)
        raise denial from None


async def _reserve(deps: Deps, call: ToolCall, assembly: Assembly, grant: ToolGrant) -> Admission:
    tool = grant.tool
    entry = make_entry(
        Kind.REQUEST, rid=call.request_id, tool=grant.name, asm=assembly.id, req_hash=call.request_hash,
        est_nanos=tool.price_nanos, est_tokens=0, endpoint=ENDPOINT, ts=int(time.time() * 1000),
        body=call.raw, compress_over=deps.settings.journal.compress_over_bytes,
    )
    capped = None if tool.max_calls is None else (f"mcp:{tool.entry}", tool.max_calls)
    try:
        return await deps.ledger.reserve(
            session_id=call.claims.session_id, tenant=call.claims.tenant, request_id=call.request_id,
            est_nanos=tool.price_nanos, est_tokens=0, step_candidates=_candidates(assembly, grant.candidate_steps),
            limits=assembly.limits, entry=entry, request_hash=call.request_hash, capped=capped,
        )
    except StateConflict as exc:
        allowed = _allowed_next(assembly, exc.extra.get("current_step"))
        denial = StateConflict(
            f"tool call fits no step allowed next; allowed: {', '.join(allowed) or 'none'}",
            code=exc.code, extra={**exc.extra, "allowed_steps": allowed},
        )
        await _journal_denial(deps, call, assembly, denial)
        raise denial from None
    except GatewayError as denial:
        if denial.status != 503:  # Redis is what failed: there is nowhere to journal it
            await _journal_denial(deps, call, assembly, denial)
        raise


def _server(deps: Deps, grant: ToolGrant) -> ToolServer:
    if grant.tool.server not in deps.tool_servers:
        raise UpstreamError(f"tool server {grant.tool.server!r} of '{grant.name}' is no longer in the gateway settings")
    return deps.tool_servers.get(grant.tool.server)


async def _upstream(server: ToolServer, adm: _Admitted) -> dict[str, Any]:
    """The rug-pull check, then the call, with the bare tool name and the gateway's credentials."""
    tool = adm.grant.tool
    started = time.perf_counter()
    try:
        if await server.current_hash(tool.name) != tool.definition_hash:
            raise UpstreamError(
                f"tool '{adm.grant.name}' changed on its server since the Assembly was compiled; recompile to approve it",
                code="tool_changed",
            )
        return await server.call(tool.name, adm.grant.arguments)
    finally:
        adm.upstream_s = time.perf_counter() - started


async def _recorded(deps: Deps, adm: _Admitted) -> bytes:
    """A recorded replay: the source journal's answer to the same call; the server is not asked."""
    call = adm.call
    assert call.claims.replay_of is not None
    provider = await recorded_provider(
        deps.redis, deps.ledger, session_id=call.claims.session_id, source=call.claims.replay_of,
        request_hash=call.request_hash, body=call.params,
    )
    reply = await provider.send(Endpoint.CHAT, call.params, request_id=call.request_id)  # the endpoint is not read
    return reply.body


def _tags(adm: _Admitted) -> CostTags:
    claims = adm.call.claims
    return CostTags(
        tenant=claims.tenant or "default", session_id=claims.session_id, model=cost_tag(adm.grant.name), assembly_id=adm.assembly.id,
    )


async def _settle(deps: Deps, adm: _Admitted, body: bytes, *, is_error: bool) -> ToolAnswer:
    cost = adm.grant.tool.price_nanos
    gateway_s = time.perf_counter() - adm.call.started - adm.upstream_s
    entry = make_entry(
        Kind.RESPONSE, rid=adm.call.request_id, tool=adm.grant.name, asm=adm.assembly.id, req_hash=adm.call.request_hash,
        tok_in=0, tok_out=0, cost_nanos=cost, gw_us=int(gateway_s * 1e6), up_us=int(adm.upstream_s * 1e6), status=200,
        is_error=is_error, ts=int(time.time() * 1000), body=body, compress_over=deps.settings.journal.compress_over_bytes,
    )
    settlement = await deps.ledger.settle(
        session_id=adm.call.claims.session_id, request_id=adm.call.request_id, actual_nanos=cost,
        actual_tokens=0, advance=True, entry=entry, tags=_tags(adm),
    )
    deps.metrics.observe_tool(adm.call.claims.tenant, adm.assembly.id, adm.grant.tool.server, adm.grant.name, "error_result" if is_error else "ok",
                              cost, gateway_s, adm.upstream_s)
    return ToolAnswer(body, cost, settlement.budget_left_nanos)


async def _fail(deps: Deps, adm: _Admitted, exc: GatewayError, cost: int) -> None:
    """Settle a failed call: release the reservation (charge `cost`: the server did work), journal it."""
    entry = make_entry(
        Kind.ERROR, rid=adm.call.request_id, tool=adm.grant.name, asm=adm.assembly.id, req_hash=adm.call.request_hash,
        tok_in=0, tok_out=0, cost_nanos=cost, status=exc.status, code=exc.code, message=exc.message,
        up_us=int(adm.upstream_s * 1e6), ts=int(time.time() * 1000),
    )
    await deps.ledger.settle(
        session_id=adm.call.claims.session_id, request_id=adm.call.request_id, actual_nanos=cost,
        actual_tokens=0, advance=False, entry=entry, tags=_tags(adm),
    )
    deps.metrics.observe_tool(adm.call.claims.tenant, adm.assembly.id, adm.grant.tool.server, adm.grant.name, exc.code, cost, 0.0, adm.upstream_s)


async def _journal_denial(deps: Deps, call: ToolCall, assembly: Assembly, denial: GatewayError) -> None:
    deps.metrics.observe_denial(denial)
    name = call.params.get("name")
    entry = make_entry(
        Kind.DENIAL, rid=call.request_id, tool=name if isinstance(name, str) else None, asm=assembly.id,
        req_hash=call.request_hash, endpoint=ENDPOINT, status=denial.status, code=denial.code,
        rule=denial.extra.get("rule"), message=denial.message, ts=int(time.time() * 1000),
        body=call.raw, compress_over=deps.settings.journal.compress_over_bytes,
    )
    await deps.ledger.append(call.claims.session_id, entry)


def _candidates(assembly: Assembly, candidate_steps: tuple[str, ...]) -> str:
    """For the reserve script: from which states each candidate step may run (as the spine does)."""
    if not assembly.steps:
        return ""
    preds = assembly.predecessors
    return ";".join(f"{sid}={','.join(preds.get(sid, []))}" for sid in candidate_steps) or "-="


def _allowed_next(assembly: Assembly, current: str | None) -> list[str]:
    if not current:
        return [assembly.steps[0].id] if assembly.steps else []
    step = assembly.step(current)
    return list(step.next) if step else []


def budget_headers(answer: ToolAnswer) -> dict[str, str]:
    headers = {"x-abc-cost-usd": nanos_to_usd_str(answer.cost_nanos)}
    if answer.budget_left_nanos >= 0:
        headers["x-abc-budget-remaining-usd"] = nanos_to_usd_str(answer.budget_left_nanos)
    return headers
