"""Suggestions: a revised plan read from what the plan's sessions did, each change with its
evidence (counts, percentiles, session ids).

Rules, with the numbers each uses (percentiles are nearest-rank, money integer nanos):
- `max_tokens`: the p99 of answers' output tokens plus a quarter, rounded up to 16; lowered
  when that is under the cap, doubled when a tenth or more of the answers hit the cap.
- tools: never called by the model and never offered -> removed; offered but never called,
  or every request offering it denied -> flagged for review.
- steps: never reached -> flagged; a transition denied MIN_DENIED times or more -> the edge
  added (a missing edge, or an agent off its rails: the evidence says which sessions).
- budgets: the p95 of spend (tokens, requests) per session plus half, rounded up to a cent
  (1000 tokens, 1 request); lowered when under the budget, raised when sessions ran out.
  Requests denied only for their step count as requests: a missing edge added admits them.
- a cheaper model of the same kind from the settings, when answers are short (p95 of output
  tokens up to SHORT_ANSWER): flagged, with the recorded usage priced at both.
- MCP tools (tool-call journal entries): observed calls per session and spend, flagged.
Only changes marked "apply" are written into the revised plan; "review" ones are for a person.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.assembly.model import Assembly, FrozenPrice
from gateway.assembly.plan import MAX_TOKENS
from gateway.assembly.prices import freeze_price
from gateway.decision.observe import MODEL_ENDPOINTS, SETTLED, Request, SessionLog
from gateway.decision.planfile import plan_yaml, usd_of_nanos
from gateway.errors import GatewayError
from gateway.money import cost_nanos, nanos_to_usd_str
from gateway.pipeline import policy
from gateway.pipeline.request_fields import offered_tools
from gateway.providers.base import Endpoint
from gateway.settings import Settings

__all__ = ["Change", "Suggestions", "percentile", "suggest"]

MIN_CALLS = 5
MIN_SESSIONS = 3
MIN_DENIED = 3
SHORT_ANSWER = 256
CAP_ROUND = 16
CENT_NANOS = 10_000_000
MAX_IDS = 20


def percentile(values: Sequence[int], p: int) -> int:
    """Nearest-rank percentile: the smallest value with at least p% of values at or under it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p * len(ordered) / 100), 1) - 1]


def _round_up(value: int, step: int) -> int:
    return max(-(-value // step) * step, step)


@dataclass(frozen=True, slots=True)
class Change:
    kind: str
    path: str
    before: Any
    after: Any
    action: str  # apply | review
    summary: str
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "before": self.before, "after": self.after,
                "action": self.action, "summary": self.summary, "evidence": self.evidence}


@dataclass(slots=True)
class Suggestions:
    plan: dict[str, Any]
    base: Assembly
    logs: Sequence[SessionLog]
    settings: Settings
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # rules that had too little to go on

    def to_dict(self) -> dict[str, Any]:
        header = [f"Suggested revision of plan {self.base.name!r} (from {self.base.id}),",
                  f"read from {len(self.logs)} session(s). Review, evaluate, then compile.", ""]
        header += [f"[{c.action}] {c.summary}" for c in self.changes] or ["no change suggested"]
        return {
            "object": "plan.suggestions",
            "plan": self.base.name,
            "assembly_id": self.base.id,
            "sessions": len(self.logs),
            "calls": sum(len(log.admitted) for log in self.logs),
            "changes": [c.to_dict() for c in self.changes],
            "notes": self.notes,
            "revised_plan": self.plan,
            "yaml": plan_yaml(self.plan, header=header),
        }


def _ids(logs: Sequence[SessionLog]) -> list[str]:
    return sorted({log.session_id for log in logs})[:MAX_IDS]


def _answers(logs: Sequence[SessionLog], model: str) -> list[tuple[SessionLog, Request]]:
    return [(log, r) for log in logs for r in log.admitted
            if r.model == model and r.outcome is not None and r.outcome.kind in SETTLED]


def suggest(plan: dict[str, Any], base: Assembly, logs: Sequence[SessionLog], settings: Settings,
            assemblies: Mapping[str, Assembly]) -> Suggestions:
    """Changes to `plan` (the plan of `base`) that the sessions' journals argue for."""
    out = Suggestions(copy.deepcopy(plan), base, logs, settings)
    rules: list[Callable[[Suggestions], None]] = [_caps, _cheaper, _tools, _mcp, _steps_reached, _budgets]
    for rule in rules:
        rule(out)
    _transitions(out, assemblies)
    return out


def _plan_model(plan: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in plan.get("models", []) if m.get("name") == name), None)


def _caps(s: Suggestions) -> None:
    for name, grant in s.base.models.items():
        answers = _answers(s.logs, name)
        outputs = [r.outcome.tok_out for _, r in answers if r.outcome is not None]
        if grant.kind == "embedding":
            continue
        if len(outputs) < MIN_CALLS:
            s.notes.append(f"{name}: {len(outputs)} answer(s); caps and cheaper models need {MIN_CALLS}")
            continue
        p99, cap = percentile(outputs, 99), grant.max_tokens
        at_cap = sum(o >= cap for o in outputs)
        proposed = _round_up(math.ceil(p99 * 5 / 4), CAP_ROUND)
        if at_cap * 10 >= len(outputs):
            proposed, why = min(cap * 2, MAX_TOKENS), f"{at_cap} of {len(outputs)} answers stopped at the cap"
        else:
            why = f"p99 of output tokens is {p99} over {len(outputs)} answers"
        if proposed == cap or (proposed > cap and not at_cap):
            continue
        entry = _plan_model(s.plan, name)
        if entry is not None:
            entry["max_tokens"] = proposed
        evidence = {"answers": len(outputs), "p50": percentile(outputs, 50), "p95": percentile(outputs, 95),
                    "p99": p99, "max": max(outputs), "at_cap": at_cap, "sessions": _ids([log for log, _ in answers])}
        s.changes.append(Change("max_tokens", f"models.{name}.max_tokens", cap, proposed, "apply",
                                f"{name}: max_tokens {cap} -> {proposed} ({why}, margin 25%)", evidence))


def _cheaper(s: Suggestions) -> None:
    for name, grant in s.base.models.items():
        answers = _answers(s.logs, name)
        usage = [(r.outcome.tok_in, r.outcome.tok_out) for _, r in answers if r.outcome is not None]
        if grant.kind == "embedding" or len(usage) < MIN_CALLS or percentile([o for _, o in usage], 95) > SHORT_ANSWER:
            continue
        actual = sum(_priced(grant.price, i, o) for i, o in usage)
        best = _cheapest(s, grant.kind, name, usage)
        if best is None or best[1] >= actual:
            continue
        evidence = {"answers": len(usage), "tokens_in": sum(i for i, _ in usage), "tokens_out": sum(o for _, o in usage),
                    "p95_output_tokens": percentile([o for _, o in usage], 95), "cost_nanos": actual,
                    "cost_at_alternative_nanos": best[1], "sessions": _ids([log for log, _ in answers])}
        s.changes.append(Change("cheaper_model", f"models.{name}", name, best[0], "review",
                                f"{name}: answers are short; {best[0]} would have cost {nanos_to_usd_str(best[1])}"
                                f" instead of {nanos_to_usd_str(actual)} USD", evidence))


def _priced(price: FrozenPrice, tok_in: int, tok_out: int) -> int:
    return cost_nanos(tok_in, price.input_nanos_per_mtok) + cost_nanos(tok_out, price.output_nanos_per_mtok)


def _cheapest(s: Suggestions, kind: str, name: str, usage: list[tuple[int, int]]) -> tuple[str, int] | None:
    found: list[tuple[int, str]] = []
    for model in s.settings.models:
        other = model.name.strip().lower()
        price = freeze_price(model) if other != name and model.kind == kind else None
        if price is not None:
            found.append((sum(_priced(price, i, o) for i, o in usage), other))
    if not found:
        return None
    cost, cheapest = min(found)
    return cheapest, cost


def _offers(request: Request) -> frozenset[str]:
    try:
        functions, _ = offered_tools(request.body)
    except GatewayError:
        return frozenset()
    return functions


def _tools(s: Suggestions) -> None:
    requests = [(log, r) for log in s.logs for r in log.requests if not r.tool_call]
    called = Counter(t for _, r in requests if r.outcome is not None for t in r.outcome.tools_called)
    for name in sorted(s.base.tools):
        offering = [(log, r) for log, r in requests if name in _offers(r)]
        denied = [(log, r) for log, r in offering if not r.admitted]
        evidence = {"offered": len(offering), "denied": len(denied), "called": called[name],
                    "sessions": _ids([log for log, _ in offering])}
        if called[name] == 0 and not offering:
            _remove_tool(s.plan, name)
            s.changes.append(Change("tool_unused", f"tools.{name}", name, None, "apply",
                                    f"tool {name}: never offered nor called in {len(s.logs)} session(s): removed", evidence))
        elif offering and len(denied) == len(offering):
            s.changes.append(Change("tool_always_denied", f"tools.{name}", name, None, "review",
                                    f"tool {name}: all {len(offering)} requests offering it were denied", evidence))
        elif called[name] == 0:
            s.changes.append(Change("tool_never_called", f"tools.{name}", name, None, "review",
                                    f"tool {name}: offered {len(offering)} times, never called: remove it?", evidence))


def _remove_tool(plan: dict[str, Any], name: str) -> None:
    plan["tools"] = [t for t in plan.get("tools", []) if t.get("name") != name]
    if not plan["tools"]:
        del plan["tools"]
    for step in plan.get("steps", []):
        if name in step.get("tools", []):
            step["tools"] = [t for t in step["tools"] if t != name]


def _mcp(s: Suggestions) -> None:
    per_tool: dict[str, dict[str, int]] = {}
    spend: Counter[str] = Counter()
    for log in s.logs:
        for r in log.requests:
            if r.tool_call and r.admitted and r.tool_name:
                per_tool.setdefault(r.tool_name, Counter())[log.session_id] += 1
                spend[r.tool_name] += r.outcome.cost if r.outcome else 0
    for tool, by_session in sorted(per_tool.items()):
        counts = [by_session.get(log.session_id, 0) for log in s.logs]
        calls = sum(counts)
        max_calls = max(math.ceil(percentile(counts, 95) * 3 / 2), 1)
        evidence = {"calls": calls, "p95_calls_per_session": percentile(counts, 95), "max_calls_per_session": max(counts),
                    "cost_nanos": spend[tool], "cost_per_call_nanos": spend[tool] // calls if calls else 0,
                    "sessions": _ids([log for log in s.logs if by_session.get(log.session_id)])}
        s.changes.append(Change("mcp_tool", f"mcp.{tool}", None, {"max_calls": max_calls}, "review",
                                f"MCP tool {tool}: {calls} calls, p95 {percentile(counts, 95)} per session:"
                                f" max_calls {max_calls}", evidence))


def _steps_reached(s: Suggestions) -> None:
    reached = Counter(r.step for log in s.logs for r in log.admitted if r.step)
    for step in s.base.steps:
        if reached[step.id] == 0 and s.logs:
            s.changes.append(Change("step_never_reached", f"steps.{step.id}", step.id, None, "review",
                                    f"step {step.id}: never reached in {len(s.logs)} session(s)",
                                    {"sessions": _ids(s.logs), "reached": dict(sorted(reached.items()))}))


def _wanted_step(assembly: Assembly | None, request: Request) -> str | None:
    """The step a denied request asked for: the first step of its session's Assembly it fits."""
    if assembly is None or request.endpoint not in MODEL_ENDPOINTS:
        return None
    try:
        grant = policy.authorize(assembly, Endpoint(request.endpoint), request.body, known_models=())
    except GatewayError:
        return None
    return grant.candidate_steps[0] if grant.candidate_steps else None


def _transitions(s: Suggestions, assemblies: Mapping[str, Assembly]) -> None:
    denied: dict[tuple[str, str], list[str]] = {}
    for log in s.logs:
        for r in log.requests:
            if not r.admitted and r.code == "step_not_allowed" and r.rule != "no_step_fits":
                wanted = _wanted_step(assemblies.get(log.assembly_id), r)
                if wanted is not None:
                    denied.setdefault((r.from_step or "^", wanted), []).append(log.session_id)
    steps = {step.get("id"): step for step in s.plan.get("steps", [])}
    for (src, dst), sessions in sorted(denied.items()):
        if len(sessions) < MIN_DENIED:
            continue
        evidence = {"denied": len(sessions), "sessions": sorted(set(sessions))[:MAX_IDS]}
        where = f"{len(sessions)} times in {len(set(sessions))} session(s)"
        if src in steps and dst not in steps[src].get("next", []):
            steps[src]["next"] = [*steps[src].get("next", []), dst]
            s.changes.append(Change("transition_added", f"steps.{src}.next", None, f"{src}->{dst}", "apply",
                                    f"transition {src} -> {dst} denied {where}: a missing edge"
                                    " (or an agent off its rails)", evidence))
        else:
            s.changes.append(Change("transition_denied", f"steps.{src}", None, f"{src}->{dst}", "review",
                                    f"requests for step {dst} from {src} denied {where}", evidence))


def _budgets(s: Suggestions) -> None:
    if len(s.logs) < MIN_SESSIONS:
        s.notes.append(f"{len(s.logs)} session(s); budgets need {MIN_SESSIONS}")
        return
    budget = s.base.budget
    _budget(s, "usd", budget.usd_nanos, [log.spent_nanos for log in s.logs], CENT_NANOS)
    _budget(s, "tokens", budget.tokens, [log.spent_tokens for log in s.logs], 1000)
    # Requests denied only for their step count too: an edge added above would admit them.
    tried = [len(log.admitted) + sum(r.code == "step_not_allowed" for r in log.requests) for log in s.logs]
    _budget(s, "requests", budget.requests, tried, 1)


def _ran_out(log: SessionLog, what: str) -> bool:
    return any((r.message or "").startswith(f"budget exhausted: {what} ") for r in log.ran_out)


def _budget(s: Suggestions, what: str, current: int | None, per_session: list[int], step: int) -> None:
    p95 = percentile(per_session, 95)
    proposed = _round_up(math.ceil(p95 * 3 / 2), step)
    ran_out = [log.session_id for log in s.logs if _ran_out(log, what)]
    if current is None or proposed == current or (proposed > current) != bool(ran_out):
        return  # lower only when nobody ran out, raise only when someone did
    shown: Callable[[int], str] = nanos_to_usd_str if what == "usd" else str
    evidence: dict[str, Any] = {"sessions": len(per_session), "p50": percentile(per_session, 50), "p95": p95,
                                "max": max(per_session), "ran_out": ran_out[:MAX_IDS]}
    s.plan.setdefault("budget", {})[what] = usd_of_nanos(proposed) if what == "usd" else proposed
    why = f"{len(ran_out)} session(s) ran out" if ran_out else f"p95 per session is {shown(p95)}"
    s.changes.append(Change(f"budget_{what}", f"budget.{what}", shown(current), shown(proposed), "apply",
                            f"budget.{what}: {shown(current)} -> {shown(proposed)} ({why}, margin 50%)", evidence))
