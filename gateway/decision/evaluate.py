"""Counterfactual evaluation: a candidate plan run against what really happened.

The candidate is compiled in memory (never stored: evaluating changes nothing a session
could see). Then each recorded request of the given sessions, in journal order, goes
through what the candidate would have enforced, with no provider called:
- the PEP (`policy.authorize`) and the settings' request plugins;
- the step machine, kept in memory exactly as `budget_reserve_v2` moves it: the first
  candidate step whose predecessors hold the current step ("^" before the first) is
  taken, and the session moves there when the recorded answer settled;
- the budget check of that script (spend so far + the worst-case estimate at the
  candidate's frozen prices against its usd, tokens and requests budgets);
- the recorded answer's tool calls against the candidate (`policy.check_output`);
- the candidate's frozen prices applied to the recorded token counts, with the output
  cut at the candidate's cap when the answer was longer (it would have been truncated).

Not modelled: rate limits and the tenant's daily spend (they depend on the wall clock and
on other sessions). Requests the journal denied are evaluated too: the candidate may now
allow them, but what they would have cost is unknown (reported, counted as zero). A session
that had set a budget lower than its Assembly's keeps that lower cap. `with_models` renames
the recorded requests' models first, for a candidate that swaps one; the live part
(`--live`) is gateway/decision/rerun.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway import plugins
from gateway.assembly.model import Assembly
from gateway.decision.observe import MODEL_ENDPOINTS, SETTLED, Request, SessionLog
from gateway.deps import Deps
from gateway.errors import BudgetExceeded, GatewayError, StateConflict
from gateway.money import nanos_to_usd_str
from gateway.pipeline import policy
from gateway.pipeline.request_fields import normalise_name
from gateway.pipeline.usage import Estimate, Usage, estimate, price
from gateway.providers.base import Endpoint
from gateway.state.entries import Kind

__all__ = ["Evaluation", "evaluate", "with_models"]

DIALECTS = frozenset({Endpoint.RESPONSES.value, Endpoint.MESSAGES.value})
DEAD_SESSION_CODES = frozenset({"invalid_api_key", "session_revoked", "session_expired", "session_not_found"})


@dataclass(slots=True)
class Verdict:
    """One recorded request under the candidate."""

    session_id: str
    index: int
    request_id: str
    recorded: str  # admitted | denied
    recorded_code: str | None
    verdict: str  # allowed | denied | skipped
    model: str = ""
    code: str | None = None
    rule: str | None = None
    reason: str | None = None
    step_recorded: str = ""
    step: str = ""
    tok_in: int = 0
    tok_out: int = 0
    truncated_from: int | None = None  # recorded output tokens, when above the candidate's cap
    cost_actual: int = 0
    cost: int = 0
    spend_unknown: bool = False  # denied then, allowed now: its answer never existed

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["cost_actual_usd"] = nanos_to_usd_str(self.cost_actual)
        out["cost_usd"] = nanos_to_usd_str(self.cost)
        return out


@dataclass(slots=True)
class _State:
    budget_nanos: int | None
    budget_tokens: int | None
    budget_requests: int | None
    step: str = ""
    spent: int = 0
    tokens: int = 0
    requests: int = 0


@dataclass(slots=True)
class SessionResult:
    session_id: str
    assembly_id: str
    budget_nanos: int | None
    verdicts: list[Verdict] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        v = self.verdicts
        ran_out = [x.index for x in v if x.code == BudgetExceeded.code]
        actual, spend = sum(x.cost_actual for x in v), sum(x.cost for x in v)
        return {
            "session_id": self.session_id,
            "assembly_id": self.assembly_id,
            "budget_usd": None if self.budget_nanos is None else nanos_to_usd_str(self.budget_nanos),
            "calls": len(v),
            "allowed": sum(x.verdict == "allowed" for x in v),
            "denied": sum(x.verdict == "denied" for x in v),
            "skipped": sum(x.verdict == "skipped" for x in v),
            "newly_denied": [x.index for x in v if x.recorded == "admitted" and x.verdict == "denied"],
            "newly_allowed": [x.index for x in v if x.recorded == "denied" and x.verdict == "allowed"],
            "truncated": [x.index for x in v if x.truncated_from is not None],
            "broken_steps": [x.index for x in v if x.code == StateConflict.code],
            "ran_out_of_budget": bool(ran_out),
            "ran_out_at": ran_out[0] if ran_out else None,
            "spend_actual_nanos": actual,
            "spend_nanos": spend,
            "spend_actual_usd": nanos_to_usd_str(actual),
            "spend_usd": nanos_to_usd_str(spend),
        }


@dataclass(frozen=True, slots=True)
class Evaluation:
    candidate: Assembly
    warnings: list[str]
    sessions: list[SessionResult]

    def to_dict(self) -> dict[str, Any]:
        summaries = [s.summary() for s in self.sessions]
        actual = sum(s["spend_actual_nanos"] for s in summaries)
        spend = sum(s["spend_nanos"] for s in summaries)
        calls = [v.to_dict() for s in self.sessions for v in s.verdicts]
        return {
            "object": "plan.evaluation",
            "plan": self.candidate.name,
            "candidate_assembly_id": self.candidate.id,
            "warnings": self.warnings,
            "provider_calls": 0,
            "totals": {
                "sessions": len(summaries),
                "calls": len(calls),
                "allowed": sum(s["allowed"] for s in summaries),
                "denied": sum(s["denied"] for s in summaries),
                "newly_denied": sum(len(s["newly_denied"]) for s in summaries),
                "newly_allowed": sum(len(s["newly_allowed"]) for s in summaries),
                "sessions_out_of_budget": [s["session_id"] for s in summaries if s["ran_out_of_budget"]],
                "spend_actual_nanos": actual,
                "spend_nanos": spend,
                "spend_actual_usd": nanos_to_usd_str(actual),
                "spend_usd": nanos_to_usd_str(spend),
            },
            "sessions": summaries,
            "calls": calls,
        }


def with_models(logs: Sequence[SessionLog], model_map: Mapping[str, str]) -> list[SessionLog]:
    """`logs` with each request's model renamed by `model_map` (a recorded name -> one of the
    candidate's): a candidate that swaps a model is asked the same questions of its own."""
    renames = {normalise_name(old): new for old, new in model_map.items()}
    if not renames:
        return list(logs)

    def renamed(request: Request) -> Request:
        model = request.body.get("model")
        new = renames.get(normalise_name(model)) if isinstance(model, str) else None
        return request if new is None else dataclasses.replace(request, body={**request.body, "model": new})

    return [dataclasses.replace(log, requests=[renamed(r) for r in log.requests]) for log in logs]


def evaluate(
    deps: Deps, candidate: Assembly, warnings: list[str], logs: Sequence[SessionLog], originals: Mapping[str, Assembly]
) -> Evaluation:
    """Run every recorded request of `logs` through `candidate`; no I/O. `originals` are
    the sessions' own Assemblies, by id (they tell a budget the session lowered itself)."""
    return Evaluation(candidate, warnings, [_session(deps, candidate, log, originals.get(log.assembly_id)) for log in logs])


def _session(deps: Deps, candidate: Assembly, log: SessionLog, original: Assembly | None) -> SessionResult:
    state = _State(_budget(candidate, log, original), candidate.budget.tokens, candidate.budget.requests)
    result = SessionResult(log.session_id, log.assembly_id, state.budget_nanos)
    for request in log.requests:
        result.verdicts.append(_call(deps, candidate, state, log.session_id, request))
    return result


def _budget(candidate: Assembly, log: SessionLog, original: Assembly | None) -> int | None:
    """The candidate's usd budget, or the session's own when it had chosen one below its Assembly's."""
    mine, theirs = log.budget_nanos, None if original is None else original.budget.usd_nanos
    lowered = mine is not None and (theirs is None or mine < theirs)
    if not lowered or mine is None:
        return candidate.budget.usd_nanos
    return mine if candidate.budget.usd_nanos is None else min(mine, candidate.budget.usd_nanos)


def _call(deps: Deps, candidate: Assembly, state: _State, session_id: str, request: Request) -> Verdict:
    verdict = Verdict(
        session_id, request.index, request.request_id, "admitted" if request.admitted else "denied",
        request.code, "allowed", model=request.model, step_recorded=request.step,
        cost_actual=request.outcome.cost if request.outcome else 0,
    )
    skip = _skip_reason(request)
    if skip is not None:
        verdict.verdict, verdict.reason, verdict.cost = "skipped", skip, verdict.cost_actual
        return verdict
    try:
        _admit(deps, candidate, state, request, verdict)
    except GatewayError as exc:
        verdict.verdict, verdict.code, verdict.reason = "denied", exc.code, exc.message
        verdict.rule = exc.extra.get("rule") if isinstance(exc.extra.get("rule"), str) else None
    return verdict


def _skip_reason(request: Request) -> str | None:
    if request.tool_call:
        return "an MCP tool call: not evaluated, its recorded cost is kept"
    if request.endpoint not in MODEL_ENDPOINTS:
        return f"endpoint {request.endpoint!r} is not evaluated; its recorded cost is kept"
    if request.endpoint in DIALECTS:
        # The PEP checks these in chat form, which the HTTP layer builds (from stored
        # responses too); the journal keeps the body as the client sent it.
        return f"a /v1/{request.endpoint} call: not evaluated, its recorded cost is kept"
    if not request.admitted and request.code in DEAD_SESSION_CODES:
        return "denied because the session was no longer live, not by the plan"
    return None


def _admit(deps: Deps, candidate: Assembly, state: _State, request: Request, verdict: Verdict) -> None:
    """The checks of the PEP and the reserve script in their order; raises the denial."""
    endpoint = Endpoint(request.endpoint)
    grant = policy.authorize(candidate, endpoint, request.body, known_models=deps.known_models)
    # The candidate's own plugins, as the Exchange would run them (their request hooks only).
    run = plugins.Run(plugins.for_call(deps.plugins, candidate, grant.candidate_steps))
    if run:
        grant = dataclasses.replace(grant, body=run.request(grant.body))
    verdict.model = grant.model.name
    est = estimate(grant.model, endpoint, grant.body, n=grant.n, max_tokens=grant.max_output_tokens)
    step = _next_step(candidate, state.step, grant.candidate_steps)
    _check_budget(state, est)
    verdict.step = step
    usage = _usage(request, grant, verdict)
    state.requests += 1
    outcome = request.outcome
    cost = est.nanos if outcome is not None and outcome.kind == Kind.ABORTED else price(grant.model, usage)
    verdict.tok_in, verdict.tok_out, verdict.cost = usage.prompt_tokens, usage.completion_tokens, cost
    state.spent += cost
    state.tokens += usage.total
    if outcome is not None:
        # The upstream did the work: charged even when its tool call is refused (and then
        # the session does not advance, as when the ledger settles a failed call).
        policy.check_output(candidate, grant, outcome.tools_called)
    answered = outcome.kind in SETTLED if outcome is not None else not request.admitted
    if answered and step:
        state.step = step


def _next_step(candidate: Assembly, current: str, candidates: tuple[str, ...]) -> str:
    """The reserve script's choice: the first candidate that may follow `current`."""
    if not candidate.steps:
        return ""
    here = current or "^"
    for step in candidates:
        if here in candidate.predecessors.get(step, ()):
            return step
    step_now = candidate.step(current) if current else None
    allowed = list(step_now.next) if step_now else ([candidate.steps[0].id] if not current else [])
    raise StateConflict(
        f"request fits no step allowed next; allowed: {', '.join(allowed) or 'none'}",
        extra={"rule": "step_not_allowed", "current_step": current or None, "allowed_steps": allowed},
    )


def _check_budget(state: _State, est: Estimate) -> None:
    checks = (
        ("usd", state.budget_nanos, state.spent + est.nanos, state.spent),
        ("tokens", state.budget_tokens, state.tokens + est.tokens, state.tokens),
        ("requests", state.budget_requests, state.requests + 1, state.requests),
    )
    for what, limit, wanted, used in checks:
        if limit is not None and wanted > limit:
            left = max(limit - used, 0)
            shown = nanos_to_usd_str(left) if what == "usd" else str(left)
            raise BudgetExceeded(f"budget exhausted: {what} left {shown}; this request could cost more",
                                 code="budget_exceeded", extra={"rule": f"budget_{what}", "budget": what})


def _usage(request: Request, grant: policy.Grant, verdict: Verdict) -> Usage:
    """The recorded token counts, the output cut at the candidate's cap."""
    outcome = request.outcome
    if outcome is None:
        verdict.spend_unknown = not request.admitted
        return Usage(0, 0)
    cap = grant.n * grant.max_output_tokens
    out = outcome.tok_out
    if grant.max_output_tokens and out > cap:
        verdict.truncated_from, out = out, cap
    return Usage(outcome.tok_in, out)

