"""Live replay: re-execute a journal's calls against the providers and compare the answers.

The calls run through the one Exchange (PEP, plugins, budget, journal) in a new session on the
source's Assembly, in recorded order. An answer matches when its body is byte-equal to
the recorded one, for a stream when its assembled text (content and tool calls) is equal,
and for an error when its status and code are. Pages (`offset`, `limit`, `into`) let a
caller show progress and continue in the same session, so steps keep their order.
`run_call` is also how `plan evaluate --live` asks a candidate (gateway/decision/rerun.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.capability import Claims
from gateway.deps import Deps
from gateway.errors import GatewayError, InvalidRequest
from gateway.journal.recorded import RecordedCall, recorded_calls
from gateway.pipeline.exchange import Call, exchange
from gateway.pipeline.usage import StreamMeter
from gateway.providers.base import Endpoint
from gateway.sessions import SessionRecord
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
    return session_claims(session, jti="live-replay")


def session_claims(session: SessionRecord, *, jti: str) -> Claims:
    """Admin-driven: the claims a token for `session` would carry, without minting one."""
    return Claims(
        session_id=session.session_id, assembly_id=session.assembly_id, tenant=session.tenant, jti=jti,
        issued_at=session.created_at_ms // 1000, expires_at=session.expires_at_ms // 1000,
    )


async def _rerun(deps: Deps, claims: Claims, recorded: RecordedCall) -> dict[str, Any]:
    request_id = "rpl_" + secrets.token_hex(12)
    result: dict[str, Any] = {
        "index": recorded.index, "recorded_request_id": recorded.request_id, "request_id": request_id,
        "recorded": recorded.outcome.get(b"kind", b"").decode() if recorded.outcome else None,
    }
    refused = not_replayable(recorded.request.get(b"endpoint", b"").decode())
    if refused is not None:
        result["answer"], result["match"], result["error"] = None, None, refused
        return result
    done = await run_call(deps, Call(request_id, recorded.endpoint, recorded.body, claims))
    result["answer"] = done.answer
    if done.error is not None:
        result["error"] = {"status": done.error.status, "code": done.error.code, "message": done.error.message}
    result["match"] = _matches(recorded, done.answer, done.got)
    return result


def not_replayable(endpoint: str) -> dict[str, Any] | None:
    """Why a call journaled at `endpoint` is not re-executed live, or None."""
    if endpoint in (Endpoint.RESPONSES, Endpoint.MESSAGES):
        # Their answers carry fresh ids, which later turns would then name.
        message = f"/v1/{endpoint} calls replay in recorded mode only"
        return {"status": 501, "code": "not_replayable_live", "message": message}
    return None


@dataclass(frozen=True, slots=True)
class Rerun:
    """What one call run again gave: a response's body, a stream's assembled text (content
    and tool calls), or an error ("status code", and the error itself)."""

    answer: str  # Kind.RESPONSE | Kind.STREAM | Kind.ERROR
    got: bytes | str
    error: GatewayError | None = None


async def run_call(deps: Deps, call: Call) -> Rerun:
    """One call through the same Exchange a client's call runs through: PEP, plugins, budget,
    provider, journal (an MCP tool call with its tool's pieces: the server is asked again).
    A refusal or a failure comes back as an error, not raised."""
    try:
        async with exchange(deps, call) as ex:
            if ex.tool is None and ex.grant.stream:
                meter = StreamMeter(model=ex.grant.model, prompt_estimate=0)
                async for payload in ex.stream():
                    meter.observe(orjson.loads(payload))
                return Rerun(Kind.STREAM, meter.text)
            return Rerun(Kind.RESPONSE, await ex.send())
    except GatewayError as exc:
        return Rerun(Kind.ERROR, f"{exc.status} {exc.code}", exc)


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
