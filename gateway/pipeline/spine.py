"""The request spine: one function per direction, naming each stage in order.

admit():    load the Assembly -> PEP -> estimate -> reserve + journal the request
complete(): provider -> PEP on the output -> settle + journal the response
Streams share admit() and settle through `finish()`; see gateway.http.sse.
Settlement runs shielded, so a client that hangs up can't skip it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from gateway import plugins, redis_keys
from gateway.assembly.model import Assembly
from gateway.capability import Claims
from gateway.deps import Deps
from gateway.errors import (
    CapabilityDenied,
    GatewayError,
    ServiceUnavailable,
    StateConflict,
    Unauthenticated,
)
from gateway.journal.events import Kind, make_entry
from gateway.journal.replay import recorded_provider
from gateway.money import nanos_to_usd_str
from gateway.pipeline import idempotency, policy
from gateway.pipeline.ledger import REDIS_ERRORS, Admission, CostTags
from gateway.pipeline.request_fields import redact_overrides
from gateway.pipeline.usage import Estimate, Usage, estimate, price, reply_usage
from gateway.providers.base import Endpoint, Provider

T = TypeVar("T")


@dataclass(slots=True)
class Call:
    """One client request as the HTTP layer hands it over."""

    request_id: str
    endpoint: Endpoint
    body: dict[str, Any]
    claims: Claims
    started: float = field(default_factory=time.perf_counter)
    idempotency_key: str | None = None
    # The body's bytes as the client sent them, journaled as they are; absent (a call
    # made by the gateway itself, e.g. a live replay), the body is serialised once here.
    raw: bytes | None = None
    # SHA-256 of the canonical body: what replays match on and every entry carries.
    request_hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.request_hash = hashlib.sha256(orjson.dumps(self.body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        if self.raw is None:
            self.raw = orjson.dumps(self.body)

    @property
    def idempotency_record(self) -> str | None:
        return None if self.idempotency_key is None else idempotency.record_key(self.claims, self.idempotency_key)


@dataclass(slots=True)
class Admitted:
    call: Call
    assembly: Assembly
    grant: policy.Grant
    provider: Provider
    estimate: Estimate
    admission: Admission
    upstream_started: float = 0.0
    upstream_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes
    headers: dict[str, str]


def shielded(deps: Deps, work: Awaitable[T]) -> Awaitable[T]:
    """Run `work` to the end even if our caller is cancelled (client gone, shutdown)."""
    task = asyncio.ensure_future(work)
    deps.tasks.add(task)
    task.add_done_callback(deps.tasks.discard)
    return asyncio.shield(task)


async def admit(deps: Deps, call: Call) -> Admitted | idempotency.Stored:
    """Admit `call`, or return the stored answer of the request that first used its Idempotency-Key."""
    assembly = await deps.assemblies.get(call.claims.assembly_id)
    grant = await _authorize(deps, call, assembly)
    est = estimate(grant.model, call.endpoint, grant.body, n=grant.n, max_tokens=grant.max_output_tokens)
    admission = await _reserve(deps, call, assembly, grant, est)
    if admission.held is not None:
        record = call.idempotency_record
        assert record is not None
        stored = await idempotency.await_answer(deps.redis, record, call.request_hash, admission.held)
        return stored if stored is not None else await admit(deps, call)  # the first failed: run again
    adm = Admitted(call, assembly, grant, deps.providers[grant.model.provider], est, admission)
    if call.claims.replay_of is not None:
        adm.provider = await _recorded(deps, adm)
    return adm


async def _authorize(deps: Deps, call: Call, assembly: Assembly) -> policy.Grant:
    """The PEP, then the plugins' request hooks; a denial is journaled before it is raised."""
    try:
        grant = policy.authorize(assembly, call.endpoint, call.body, known_models=deps.known_models)
        if deps.plugins:
            grant = dataclasses.replace(grant, body=plugins.run_request(deps.plugins, grant.body))
        return grant
    except GatewayError as exc:
        denial: GatewayError = exc
        # A dead session is a 401 before it is anything else; only denials pay for the look-up.
        try:
            await require_live_session(deps, call.claims.session_id)
        except Unauthenticated as dead:
            denial = dead
        await _journal_denial(deps, call, assembly, denial)
        raise denial from None


async def _reserve(deps: Deps, call: Call, assembly: Assembly, grant: policy.Grant, est: Estimate) -> Admission:
    """Reserve the worst case and journal the request, in one round trip."""
    entry = make_entry(
        Kind.REQUEST, rid=call.request_id, model=grant.model.name, asm=assembly.id,
        req_hash=call.request_hash, est_nanos=est.nanos, est_tokens=est.tokens,
        endpoint=call.endpoint.value, stream=grant.stream, ts=int(time.time() * 1000),
        body=call.raw, compress_over=deps.settings.journal.compress_over_bytes,
    )
    try:
        return await deps.ledger.reserve(
            session_id=call.claims.session_id, tenant=call.claims.tenant, request_id=call.request_id,
            est_nanos=est.nanos, est_tokens=est.tokens, step_candidates=_candidates(assembly, grant),
            limits=assembly.limits, entry=entry,
            idempotency_key=call.idempotency_record, request_hash=call.request_hash,
        )
    except StateConflict as exc:
        allowed = _allowed_next(assembly, exc.extra.get("current_step"))
        exc.message = f"request fits no step allowed next; allowed: {', '.join(allowed) or 'none'}"
        exc.extra["allowed_steps"] = allowed
        await _journal_denial(deps, call, assembly, exc)
        raise
    except GatewayError as denial:
        if denial.status != 503:  # Redis is what failed: there is nowhere to journal it
            await _journal_denial(deps, call, assembly, denial)
        raise


async def _recorded(deps: Deps, adm: Admitted) -> Provider:
    """A recorded replay is answered from the source journal; a divergence is settled at zero."""
    call = adm.call
    assert call.claims.replay_of is not None
    try:
        return await recorded_provider(
            deps.redis, deps.ledger, session_id=call.claims.session_id, source=call.claims.replay_of,
            request_hash=call.request_hash, body=call.body,
        )
    except GatewayError as exc:
        await shielded(deps, fail(deps, adm, exc, Usage(0, 0)))
        raise


async def require_live_session(deps: Deps, session_id: str) -> None:
    """Revocation and expiry for paths that reserve nothing (the reserve script checks them
    itself): a request the PEP denies, and routes such as GET /v1/models."""
    try:
        key = redis_keys.session(session_id)
        status, expires_ms = await deps.redis.hmget(key, ["status", "expires_at_ms"])  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("session store unavailable") from exc
    if status is None:
        raise Unauthenticated("session not found", code="session_not_found")
    if status == b"revoked":
        raise Unauthenticated("session revoked", code="session_revoked")
    if expires_ms is None or int(expires_ms) <= time.time() * 1000:
        raise Unauthenticated("session expired", code="session_expired")


async def complete(deps: Deps, adm: Admitted) -> Answer:
    adm.upstream_started = time.perf_counter()
    try:
        reply = await adm.provider.send(adm.call.endpoint, adm.grant.body, request_id=adm.call.request_id)
    except GatewayError as exc:
        adm.upstream_s = time.perf_counter() - adm.upstream_started
        await shielded(deps, fail(deps, adm, exc, Usage(0, 0)))
        raise
    except BaseException:
        await shielded(deps, fail(deps, adm, GatewayError("request cancelled", code="cancelled"), Usage(0, 0)))
        raise
    adm.upstream_s = time.perf_counter() - adm.upstream_started
    usage = reply_usage(reply.data, adm.estimate.prompt_tokens, adm.grant.model)
    try:
        for choice in reply.data.get("choices") or []:
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                policy.check_output(adm.assembly, adm.grant, policy.tool_call_names(message))
        rewritten = plugins.run_response(deps.plugins, reply.data) if deps.plugins else None
    except CapabilityDenied as exc:
        # The upstream did the work: charge it, journal the violation, answer the denial.
        await shielded(deps, fail(deps, adm, exc, usage))
        raise
    body = reply.body if rewritten is None else orjson.dumps(rewritten)
    return await shielded(deps, _settle_answer(deps, adm, usage, body, reply.headers))


async def _settle_answer(deps: Deps, adm: Admitted, usage: Usage, body: bytes, headers: dict[str, str]) -> Answer:
    """Settle, then keep the answer for retries carrying the same Idempotency-Key."""
    cost, left = await finish(deps, adm, usage, Kind.RESPONSE, body)
    answer = Answer(body, {**headers, **cost_headers(adm, cost, left)})
    record = adm.call.idempotency_record
    if record is not None:
        sent = {"content-type": "application/json", "x-request-id": adm.call.request_id, **answer.headers}
        await idempotency.remember(deps.redis, record, idempotency.Stored(200, sent, body))
    return answer


def cost_headers(adm: Admitted, cost: int | None, left: int) -> dict[str, str]:
    headers = {"x-abc-session": adm.call.claims.session_id}
    if cost is not None:
        headers["x-abc-cost-usd"] = nanos_to_usd_str(cost)
    if left >= 0:
        headers["x-abc-budget-remaining-usd"] = nanos_to_usd_str(left)
    return headers


async def finish(deps: Deps, adm: Admitted, usage: Usage, kind: str, body: bytes, **extra: Any) -> tuple[int, int]:
    """Settle actual usage and journal the answer; returns (cost, budget left)."""
    cost = price(adm.grant.model, usage)
    gateway_s = time.perf_counter() - adm.call.started - adm.upstream_s
    entry = make_entry(
        kind, rid=adm.call.request_id, model=adm.grant.model.name, asm=adm.assembly.id,
        req_hash=adm.call.request_hash, tok_in=usage.prompt_tokens, tok_out=usage.completion_tokens,
        cost=cost, gw_us=int(gateway_s * 1e6), up_us=int(adm.upstream_s * 1e6), status=200,
        ts=int(time.time() * 1000), body=body, compress_over=deps.settings.journal.compress_over_bytes, **extra,
    )
    settlement = await deps.ledger.settle(
        session_id=adm.call.claims.session_id, request_id=adm.call.request_id, actual_nanos=cost,
        actual_tokens=usage.total, advance=True, entry=entry, tags=_tags(adm),
    )
    deps.metrics.observe_settled(adm, usage, cost, gateway_s)
    return cost, settlement.budget_left_nanos


async def fail(deps: Deps, adm: Admitted, exc: GatewayError, usage: Usage, **extra: Any) -> int:
    """Settle a failed call: charge what was generated, refund the rest, journal the error."""
    cost = price(adm.grant.model, usage)
    entry = make_entry(
        Kind.ERROR, rid=adm.call.request_id, model=adm.grant.model.name, asm=adm.assembly.id,
        req_hash=adm.call.request_hash, tok_in=usage.prompt_tokens, tok_out=usage.completion_tokens,
        cost=cost, status=exc.status, code=exc.code, message=exc.message,
        up_us=int(adm.upstream_s * 1e6), ts=int(time.time() * 1000), **extra,
    )
    await deps.ledger.settle(
        session_id=adm.call.claims.session_id, request_id=adm.call.request_id, actual_nanos=cost,
        actual_tokens=usage.total, advance=False, entry=entry, tags=_tags(adm),
    )
    deps.metrics.observe_failed(adm, exc, cost)
    record = adm.call.idempotency_record
    if record is not None:
        await idempotency.forget(deps.redis, record)  # so a retry runs again
    return cost


def _tags(adm: Admitted) -> CostTags:
    claims = adm.call.claims
    return CostTags(tenant=claims.tenant or "default", session_id=claims.session_id, model=adm.grant.model.name, assembly_id=adm.assembly.id)


async def _journal_denial(deps: Deps, call: Call, assembly: Assembly, denial: GatewayError) -> None:
    deps.metrics.observe_denial(denial)
    # Override fields (api_key, base_url, ...) are always denied, and may carry secrets.
    redacted = redact_overrides(call.body)
    body = call.raw if redacted == call.body else orjson.dumps(redacted)
    entry = make_entry(
        Kind.DENIAL, rid=call.request_id, asm=assembly.id, req_hash=call.request_hash,
        status=denial.status, code=denial.code, rule=denial.extra.get("rule"), message=denial.message,
        ts=int(time.time() * 1000), body=body, compress_over=deps.settings.journal.compress_over_bytes,
    )
    await deps.ledger.append(call.claims.session_id, entry)


def _candidates(assembly: Assembly, grant: policy.Grant) -> str:
    """Encode, for the reserve script, from which states each candidate step may run."""
    if not assembly.steps:
        return ""
    preds = assembly.predecessors
    # A candidate with no predecessors encodes as "id=" and can never match.
    return ";".join(f"{sid}={','.join(preds.get(sid, []))}" for sid in grant.candidate_steps) or "-="


def _allowed_next(assembly: Assembly, current: str | None) -> list[str]:
    if not current:
        return [assembly.steps[0].id] if assembly.steps else []
    step = assembly.step(current)
    return list(step.next) if step else []
