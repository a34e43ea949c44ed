"""Live replay: re-execute a journal's calls against the providers and compare the answers.

The calls run through the one Exchange (PEP, plugins, budget, journal) in a new session on the
source's Assembly, in recorded order. An answer matches when its body is byte-equal to
the recorded one, for a stream when its assembled text (content and tool calls) is equal,
and for an error when its status and code are. Pages (`offset`, `limit`, `into`) let a
caller show progress and continue in the same session, so steps keep their order.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.capability import Claims
from gateway.deps import Deps
from gateway.errors import GatewayError, InvalidRequest
from gateway.journal.recorded import RecordedCall, recorded_calls
from gateway.mcp import calls as mcp_calls
from gateway.pipeline.exchange import Call, exchange
from gateway.pipeline.usage import StreamMeter
from gateway.providers.base import Endpoint
from gateway.state.entries import Kind, entry_body

LIVE_LABEL = "live_replay_of"


async def run_live(deps: Deps, source: str, *, offset: int = 0, limit: int | None = None, into: str | None = None) -> dict[str, Any]:
    calls = await recorded_calls(deps.redis, source)
    window = calls[offset: None if limit is None else offset + limit]
    claims = await _session_claims(deps, source, into)
    results = [await _rerun(deps, claims, call) for call in window]
    end = offset + len(window)
    return {
        "mode": "live", "replay_of": source, "session_id": claims.session_id, "calls": len(calls),
        "offset": offset, "next": end if end < len(calls) else None, "results": results,
        "matched": sum(r["match"] is True for r in results),
        "differed": sum(r["match"] is False for r in results),
        "unknown": sum(r["match"] is None for r in results),
    }


async def _session_claims(deps: Deps, source: str, into: str | None) -> Claims:
    """Claims for the live session: a new one, or `into` from an earlier page of this replay."""
    if into is None:
        shown = await deps.sessions.get(source)
        assembly = await deps.assemblies.get(shown.assembly_id)
        opened = await deps.sessions.open(
            assembly, tenant=shown.tenant, budget_nanos=shown.budget_nanos, ttl_s=None, labels={LIVE_LABEL: source},
        )
        into = opened.session_id
    session = await deps.sessions.get(into)
    if session.labels.get(LIVE_LABEL) != source:
        raise InvalidRequest(f"session {into} is not a live replay of {source}", param="into")
    # Admin-driven: the claims a token for this session would carry, without minting one.
    return Claims(
        session_id=into, assembly_id=session.assembly_id, tenant=session.tenant, jti="live-replay",
        issued_at=session.created_at_ms // 1000, expires_at=session.expires_at_ms // 1000,
    )


async def _rerun(deps: Deps, claims: Claims, recorded: RecordedCall) -> dict[str, Any]:
    request_id = "rpl_" + secrets.token_hex(12)
    result: dict[str, Any] = {
        "index": recorded.index, "recorded_request_id": recorded.request_id, "request_id": request_id,
        "recorded": recorded.outcome.get(b"kind", b"").decode() if recorded.outcome else None,
    }
    got: bytes | str
    dialect = recorded.request.get(b"endpoint", b"").decode()
    if dialect in (Endpoint.RESPONSES, Endpoint.MESSAGES):
        # Not re-executed: their answers carry fresh ids, which later turns would then name.
        result["answer"], result["match"] = None, None
        result["error"] = {"status": 501, "code": "not_replayable_live", "message": f"/v1/{dialect} calls replay in recorded mode only"}
        return result
    try:
        if recorded.request.get(b"endpoint") == mcp_calls.ENDPOINT.encode():
            # An MCP tool call: through the tools/call lifecycle, the server asked again.
            answer = await mcp_calls.call_tool(deps, mcp_calls.ToolCall(request_id, recorded.body, claims))
            result["answer"], got = Kind.RESPONSE, answer.body
        else:
            # The same Exchange a client's call runs through: PEP, plugins, budget, journal.
            async with exchange(deps, Call(request_id, recorded.endpoint, recorded.body, claims)) as ex:
                if ex.grant.stream:
                    meter = StreamMeter(model=ex.grant.model, prompt_estimate=0)
                    async for payload in ex.stream():
                        meter.observe(orjson.loads(payload))
                    result["answer"], got = Kind.STREAM, meter.text
                else:
                    result["answer"], got = Kind.RESPONSE, await ex.send()
    except GatewayError as exc:
        result["answer"], got = Kind.ERROR, f"{exc.status} {exc.code}"
        result["error"] = {"status": exc.status, "code": exc.code, "message": exc.message}
    result["match"] = _matches(recorded, result["answer"], got)
    return result


def _matches(recorded: RecordedCall, answer: str, got: bytes | str) -> bool | None:
    outcome = recorded.outcome
    if outcome is None or outcome.get(b"kind") == Kind.ABORTED.encode():
        return None  # nothing was recorded to compare with
    kind = outcome[b"kind"].decode()
    if kind != answer:
        return False
    if kind == Kind.RESPONSE:
        return entry_body(outcome) == got
    if kind == Kind.STREAM:
        return recorded_text(outcome) == got
    return f"{outcome.get(b'status', b'').decode()} {outcome.get(b'code', b'').decode()}" == got


def recorded_text(outcome: Mapping[bytes, bytes]) -> str:
    raw = entry_body(outcome)
    meter = StreamMeter(model=None, prompt_estimate=0)  # type: ignore[arg-type]  # observe() never reads it
    for payload in raw.split(b"\n") if raw else []:
        chunk = orjson.loads(payload)
        if isinstance(chunk, dict):
            meter.observe(chunk)
    return meter.text
