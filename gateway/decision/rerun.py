"""`plan evaluate --live`: the candidate's own answers to the recorded requests, beside the
recorded ones, within a stated budget.

After the counterfactual evaluation, each recorded request the candidate allows is run again
through live replay's call (gateway.journal.live.run_call: the one Exchange, so PEP,
plugins, reservation, provider and journal as for any client) in an evaluation session on
the candidate's Assembly: one per recorded session, so steps keep their order, labelled
`evaluation_of` (the recorded session), journaled like any session and never counted among
the plan's sessions. The candidate's Assembly is stored (content-addressed, as a session's
Assembly must be) but not recorded as a version: compiling stays an explicit act.

The cap is enforced by the ordinary reservation: each evaluation session's usd budget is
what is left of the cap when it opens (no more than the candidate's own budget). The call
the reservation refuses for the cap is where the run stops; the rest are not run.
Requests the candidate denies are not sent; MCP tool calls and Responses/Messages calls are
not replayable live (see gateway.journal.live).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.assembly.model import Assembly
from gateway.capability import Claims
from gateway.decision.evaluate import Evaluation, SessionResult, Verdict
from gateway.decision.observe import (
    EVALUATION_LABEL,
    MODEL_ENDPOINTS,
    Request,
    SessionLog,
    read_session,
)
from gateway.deps import Deps
from gateway.errors import BudgetExceeded
from gateway.journal import live
from gateway.journal.recorded import RecordedCall, recorded_calls
from gateway.money import nanos_to_usd_str, usd_to_nanos
from gateway.pipeline.exchange import Call
from gateway.providers.base import Endpoint
from gateway.state.entries import Kind, entry_body

__all__ = ["DEFAULT_CAP_NANOS", "EVALUATION_LABEL", "LiveRun", "run_live"]

DEFAULT_CAP_NANOS = usd_to_nanos(1)
TEXT_LIMIT = 2000  # characters of each answer in the report; the journals keep them whole


@dataclass(frozen=True, slots=True)
class Answer:
    """One side of a row: what was answered, by which model, for how much."""

    kind: str  # response | stream | error | aborted | denied | unsettled
    model: str
    text: str = ""
    tok_in: int = 0
    tok_out: int = 0
    cost: int = 0
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        cut = len(self.text) > TEXT_LIMIT
        return {
            "kind": self.kind, "model": self.model, "text": self.text[:TEXT_LIMIT], "text_truncated": cut,
            "tok_in": self.tok_in, "tok_out": self.tok_out,
            "cost_nanos": self.cost, "cost_usd": nanos_to_usd_str(self.cost), "error": self.error,
        }


@dataclass(slots=True)
class Row:
    session_id: str
    index: int
    request_id: str
    status: str  # run | denied | not_replayable | not_run
    recorded: Answer
    reason: str | None = None
    evaluation_session_id: str | None = None
    live_request_id: str | None = None
    live: Answer | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "index": self.index, "request_id": self.request_id,
            "status": self.status, "reason": self.reason, "evaluation_session_id": self.evaluation_session_id,
            "live_request_id": self.live_request_id, "recorded": self.recorded.to_dict(),
            "live": None if self.live is None else self.live.to_dict(),
        }


@dataclass(slots=True)
class LiveRun:
    cap_nanos: int
    cap_default: bool
    rows: list[Row] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    spent: int = 0
    sent: int = 0  # calls admitted by the evaluation sessions: those a provider was asked
    stopped_at: Row | None = None  # the call the reservation refused for the cap

    def to_dict(self) -> dict[str, Any]:
        run = [r for r in self.rows if r.status == "run"]
        recorded = sum(r.recorded.cost for r in run)
        stop = self.stopped_at
        return {
            "cap_usd": nanos_to_usd_str(self.cap_nanos), "cap_nanos": self.cap_nanos, "cap_default": self.cap_default,
            "stopped_by_cap": stop is not None,
            "stopped_at": None if stop is None else {"session_id": stop.session_id, "index": stop.index},
            "journaled": True, "label": EVALUATION_LABEL,
            "note": ("live calls ran in evaluation sessions on the candidate's Assembly, journaled like any "
                     f"session and labelled {EVALUATION_LABEL}=<recorded session>; each one's usd budget was "
                     "what was left of the cap, enforced by the reservation"),
            "sessions": self.sessions,
            "totals": {
                "requests": len(self.rows),
                "run": len(run),
                "sent": self.sent,
                "answered": sum(r.live is not None and r.live.kind in (Kind.RESPONSE, Kind.STREAM) for r in run),
                "skipped_denied": sum(r.status == "denied" for r in self.rows),
                "not_replayable": sum(r.status == "not_replayable" for r in self.rows),
                "not_run": sum(r.status == "not_run" for r in self.rows),
                "recorded_spend_nanos": recorded, "recorded_spend_usd": nanos_to_usd_str(recorded),
                "live_spend_nanos": self.spent, "live_spend_usd": nanos_to_usd_str(self.spent),
            },
            "calls": [r.to_dict() for r in self.rows],
        }


async def run_live(
    deps: Deps, evaluation: Evaluation, logs: Sequence[SessionLog], *, cap_nanos: int, cap_default: bool
) -> LiveRun:
    """Run again, live, what `evaluation` allowed of `logs` (its sessions, in the same order)."""
    run = LiveRun(cap_nanos, cap_default)
    await deps.assemblies.put(evaluation.candidate)
    for log, result in zip(logs, evaluation.sessions, strict=True):
        await _session(deps, evaluation.candidate, log, result, run)
    return run


async def _session(deps: Deps, candidate: Assembly, log: SessionLog, result: SessionResult, run: LiveRun) -> None:
    recorded = {c.request_id: c for c in await recorded_calls(deps.redis, log.session_id)}
    claims: Claims | None = None
    cap_binds = False
    mine: list[Row] = []
    for request, verdict in zip(log.requests, result.verdicts, strict=True):
        row = Row(log.session_id, request.index, request.request_id, "run", _recorded(request, recorded.get(request.request_id)))
        run.rows.append(row)
        why = _not_sent(request, verdict, run)
        if why is not None:
            row.status, row.reason = why
            continue
        if claims is None:
            claims, cap_binds = await _open(deps, candidate, log, result, run)
        row.evaluation_session_id, row.live_request_id = claims.session_id, "evl_" + secrets.token_hex(12)
        endpoint = Endpoint(request.endpoint)
        done = await live.run_call(deps, Call(row.live_request_id, endpoint, request.body, claims))
        row.live = _live(done)
        mine.append(row)
        error = done.error
        if cap_binds and isinstance(error, BudgetExceeded) and error.extra.get("budget") == "usd":
            row.reason = "the reservation refused it: the cap is reached"
            run.stopped_at = row
    if claims is not None:
        await _settled(deps, claims.session_id, mine, run)


def _not_sent(request: Request, verdict: Verdict, run: LiveRun) -> tuple[str, str] | None:
    refused = live.not_replayable(request.endpoint)
    if verdict.verdict == "skipped" or request.endpoint not in MODEL_ENDPOINTS or refused is not None:
        return "not_replayable", (refused or {}).get("message") or verdict.reason or "not a model call"
    if verdict.verdict == "denied":
        return "denied", f"not sent: the candidate denies it ({verdict.rule or verdict.code}: {verdict.reason})"
    if run.stopped_at is not None:
        return "not_run", "the cap was reached before it"
    return None


async def _open(deps: Deps, candidate: Assembly, log: SessionLog, result: SessionResult, run: LiveRun) -> tuple[Claims, bool]:
    """A fresh evaluation session on the candidate for `log`. Its usd budget is what is left
    of the cap, or the candidate's budget for this session when that is lower (then a call
    it refuses is the candidate's budget running out, not the cap). True: the cap binds."""
    left, own = max(run.cap_nanos - run.spent, 0), result.budget_nanos
    cap_binds = own is None or left <= own
    budget = left if own is None else min(left, own)
    source = await deps.sessions.get(log.session_id)
    opened = await deps.sessions.open(
        candidate, tenant=candidate.tenant or source.tenant, budget_nanos=budget, ttl_s=None,
        labels={EVALUATION_LABEL: log.session_id}, plan_session=False,
    )
    run.sessions.append({
        "session_id": opened.session_id, "evaluation_of": log.session_id,
        "budget_usd": nanos_to_usd_str(budget), "budget_is_cap": cap_binds,
    })
    return live.session_claims(await deps.sessions.get(opened.session_id), jti="live-evaluation"), cap_binds


async def _settled(deps: Deps, session_id: str, rows: list[Row], run: LiveRun) -> None:
    """Models, tokens and costs of the live answers, as the evaluation session journaled them."""
    log = await read_session(deps.redis, session_id, replays=True)
    journaled = {r.request_id: r for r in (log.requests if log is not None else [])}
    for row in rows:
        found = journaled.get(row.live_request_id or "")
        if row.live is None or found is None:
            continue
        outcome = found.outcome
        row.live = Answer(
            row.live.kind, found.model, row.live.text,
            outcome.tok_in if outcome else 0, outcome.tok_out if outcome else 0, outcome.cost if outcome else 0,
            row.live.error,
        )
        run.spent += row.live.cost
        run.sent += found.admitted


def _live(done: live.Rerun) -> Answer:
    if done.error is not None:
        error = {"status": done.error.status, "code": done.error.code, "message": done.error.message}
        return Answer(Kind.ERROR, "", error=error)
    text = done.got if isinstance(done.got, str) else reply_text(done.got)
    return Answer(done.answer, "", text)


def _recorded(request: Request, call: RecordedCall | None) -> Answer:
    if not request.admitted:
        return Answer("denied", request.model, error={"code": request.code, "message": request.message})
    outcome = request.outcome
    if outcome is None or call is None or call.outcome is None:
        return Answer("unsettled", request.model)
    fields = call.outcome
    text = ""
    if outcome.kind == Kind.RESPONSE:
        text = reply_text(entry_body(fields) or b"")
    elif outcome.kind == Kind.STREAM:
        text = live.recorded_text(fields)
    error = None
    if outcome.kind == Kind.ERROR:
        error = {"status": int(fields.get(b"status", b"0") or 0), "code": outcome.code,
                 "message": fields.get(b"message", b"").decode(errors="replace") or None}
    return Answer(outcome.kind, request.model, text, outcome.tok_in, outcome.tok_out, outcome.cost, error)


def reply_text(raw: bytes) -> str:
    """A complete answer's text as a stream of it assembles: each choice's content (or
    completion text), then its tool calls' names and arguments."""
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")
    if not isinstance(data, dict):
        return ""
    parts: list[str] = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        parts.append(str(message.get("content") or choice.get("text") or ""))
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    if data.get("object") == "list" and isinstance(data.get("data"), list):
        parts.append(f"[{len(data['data'])} embedding(s)]")
    return "".join(parts)
