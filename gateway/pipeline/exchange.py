"""The one lifecycle of a call: admit it, run it, settle it exactly once.

    async with exchange(deps, call) as ex:   # admit: Assembly, PEP, plugins, estimate,
        if ex.stored is None:                #   reserve + journal the request (one round trip)
            await ex.send()                  # or: async for payload in ex.stream(): ...
    ex.settled                               # leaving settled it: cost, budget left

Leaving the block settles under shield, whatever happened: the answer is journaled and
charged on success; on any exception (a GatewayError, a bug, a cancellation, a client
that hung up) the failure is journaled and charged what the meter counted, the rest of
the reservation refunded at once. Only a dead process leaves a reservation to the reaper.
Every caller (the HTTP routes, the SSE framer, live replay, MCP's tools/call) drives this
one object. An MCP tool call (`Endpoint.TOOLS_CALL`) swaps in the tool's pieces from
gateway.mcp: its policy (exact name, step, frozen schema), its frozen per-call price and
`max_calls`, its provider (rug-pull check, then the server) and its result checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import orjson

from gateway import plugins, redis_keys
from gateway.assembly.model import Assembly, Deployment, FrozenPrice, ModelGrant
from gateway.capability import Claims
from gateway.deps import Deps
from gateway.errors import (
    ClientGone,
    GatewayError,
    InternalError,
    RequestCancelled,
    ServiceUnavailable,
    StateConflict,
    Unauthenticated,
    UpstreamError,
)
from gateway.journal.recorded import ReplayProvider, recorded_provider
from gateway.mcp import policy as tool_policy
from gateway.mcp.provider import ToolProvider
from gateway.metrics import GenAI, denial_reason, genai
from gateway.money import nanos_to_usd_str
from gateway.pipeline import policy
from gateway.pipeline.deployments import Deployments
from gateway.pipeline.dialects import NativeUsage, StreamTranslator, Wire
from gateway.pipeline.fallbacks import FallbackChain
from gateway.pipeline.request_fields import redact_overrides
from gateway.pipeline.usage import (
    Estimate,
    StreamMeter,
    Usage,
    charge,
    dearest,
    estimate,
    reply_usage,
)
from gateway.providers.base import Endpoint, Provider
from gateway.providers.resilience import FAILED_ATTEMPTS
from gateway.request_log import CallReport
from gateway.state import idempotency
from gateway.state.entries import Kind, make_entry
from gateway.state.ledger import REDIS_ERRORS, Admission, CostTags, denial_tally
from gateway.translate.common import Tokens, chat_tokens

__all__ = ["Call", "Exchange", "Settled", "exchange", "journal_refusal", "require_live_session", "shielded"]

T = TypeVar("T")
# A client's socket closing under a write, or its handler task being cancelled.
CLIENT_GONE = (ConnectionResetError, asyncio.CancelledError)


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
    # What the request log tells of this call; the HTTP layer passes the request's own.
    report: CallReport = field(default_factory=CallReport)
    # The same request in chat-completions form, for a call in another dialect (Responses,
    # Messages): what the PEP checks and the estimate counts. None: `body` is that form.
    view: dict[str, Any] | None = None
    # SHA-256 of the canonical body: what replays match on and every entry carries.
    request_hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.request_hash = hashlib.sha256(orjson.dumps(self.body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        if self.raw is None:
            self.raw = orjson.dumps(self.body)

    @property
    def checked(self) -> tuple[Endpoint, dict[str, Any]]:
        """The endpoint and body the PEP and the estimate see."""
        return (self.endpoint, self.body) if self.view is None else (Endpoint.CHAT, self.view)

    @property
    def idempotency_record(self) -> str | None:
        return None if self.idempotency_key is None else idempotency.record_key(self.claims, self.idempotency_key)


@dataclass(frozen=True, slots=True)
class Settled:
    """How a call ended: what it cost, the budget left (-1: no usd budget), and the error if any."""

    cost_nanos: int
    budget_left_nanos: int
    error: GatewayError | None = None
    entry_id: str = ""  # of the journal entry that closed the call


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A complete answer, waiting for settlement."""

    kind: str
    usage: Usage
    body: bytes
    extra: dict[str, Any]


def shielded(deps: Deps, work: Awaitable[T]) -> Awaitable[T]:
    """Run `work` to the end even if our caller is cancelled (client gone, shutdown)."""
    task = asyncio.ensure_future(work)
    deps.tasks.add(task)
    task.add_done_callback(deps.tasks.discard)
    return asyncio.shield(task)


def exchange(deps: Deps, call: Call) -> Exchange:
    return Exchange(deps, call)


class Exchange:
    """One call's life. Admitted on entry, settled once on exit (or by `close`)."""

    def __init__(self, deps: Deps, call: Call) -> None:
        self.deps = deps
        self.call = call
        # The first answer to this call's Idempotency-Key: nothing was admitted or reserved.
        self.stored: idempotency.Stored | None = None
        self.settled: Settled | None = None
        self.upstream_headers: dict[str, str] = {}
        self.upstream_s = 0.0
        self.ttft_s: float | None = None
        self._reserved = False
        self._outcome: _Outcome | None = None
        self._answer_usage: Usage | None = None  # a complete answer's, before its checks
        self._meter: StreamMeter | NativeUsage | None = None
        self.plugin_run = plugins.Run(())  # the Assembly's plugins for this call, once authorized
        self._payloads: list[bytes] = []
        # A dialect call's last events: journaled with the rest, written once it is settled.
        self.tail: list[bytes] = []
        # Journal fields for the answer's entry (a dialect call's conversation links).
        self.extra: dict[str, Any] = {}
        self.answer_data: dict[str, Any] | None = None  # the complete answer, parsed
        self._closing: asyncio.Future[Settled] | None = None
        self._entry_id = ""
        self.tool: tool_policy.ToolGrant | None = None  # an MCP tools/call's grant; then `grant` is unset
        self._tool_answered = False  # the tool's server answered: the call is charged

    # -- admission ----------------------------------------------------------------------

    async def __aenter__(self) -> Exchange:
        deps, call = self.deps, self.call
        self.assembly: Assembly = await deps.assemblies.get(call.claims.assembly_id)
        chain = await (self._admit_tool() if call.endpoint is Endpoint.TOOLS_CALL else self._admit_model())
        while True:
            with deps.tracer.span("reserve"):
                admission = await self._reserve()
            if admission.held is None:
                break
            record = call.idempotency_record
            assert record is not None
            self.stored = await idempotency.await_answer(
                deps.ledger, call.claims.session_id, record, call.request_hash, admission.held,
                wait_s=deps.settings.budget.idempotency_wait_s,
            )
            if self.stored is not None:
                return self
            # The first attempt failed and freed its key, or died and was taken over: run it.
        self._reserved = True
        self.admission: Admission = admission
        # Retries inside a provider are recorded here (the context is this call's task).
        self.failed_attempts: list[str] = []
        FAILED_ATTEMPTS.set(self.failed_attempts)
        self.provider: Provider = (
            ToolProvider(deps.tool_servers, self.tool) if self.tool is not None else self._provider_for(self.grant.model)
        )
        if len(chain) > 1:
            self.provider = FallbackChain(chain, self._provider_for)
        if call.claims.replay_of is not None:
            try:
                self.provider = await recorded_provider(
                    deps.redis, deps.ledger, session_id=call.claims.session_id, source=call.claims.replay_of,
                    request_hash=call.request_hash, body=call.body,
                )
            except BaseException as exc:
                await self.close(exc)  # a divergence is settled at zero
                raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        if self._reserved:
            await self.close(exc)

    async def _admit_model(self) -> tuple[ModelGrant, ...]:
        """A model call's grant and worst-case estimate; the models that may serve it."""
        deps, call = self.deps, self.call
        requested = call.body.get("model")
        call.report.model = requested if isinstance(requested, str) else None
        with deps.tracer.span("pep"):
            self.grant: policy.Grant = await self._authorize()
        call.report.model, call.report.stream = self.grant.model.name, self.grant.stream
        self.estimate: Estimate = estimate(
            self.grant.model, call.checked[0], self.grant.body, n=self.grant.n, max_tokens=self.grant.max_output_tokens,
        )
        chain = self.assembly.chain(self.grant.model)
        if len(chain) > 1:  # the reservation covers the dearest model (or deployment) that may serve
            est, worst = self.estimate, Usage(self.estimate.prompt_tokens, self.estimate.max_output_tokens)
            self.estimate = Estimate(est.prompt_tokens, est.max_output_tokens, max(dearest(m, worst) for m in chain))
        return chain

    async def _authorize(self) -> policy.Grant:
        """The PEP, then the plugins' request hooks; a denial is journaled before it is raised."""
        deps, call = self.deps, self.call
        try:
            grant = policy.authorize(self.assembly, *call.checked, known_models=deps.known_models)
            await self._load_plugins(grant.candidate_steps)
            if self.plugin_run:
                grant = dataclasses.replace(grant, body=self.plugin_run.request(grant.body))
            return grant
        except GatewayError as exc:
            raise await self._denied(exc) from None

    async def _load_plugins(self, candidate_steps: tuple[str, ...]) -> None:
        """The Assembly's plugins for the steps this call could be (plan-level ones without steps)."""
        deps = self.deps
        chain = plugins.for_call(deps.plugins, self.assembly, candidate_steps)
        self.plugin_run = plugins.Run(chain, deps.metrics.observe_plugin)
        if self.plugin_run:
            await self.plugin_run.load_session(deps.redis, self.call.claims.session_id)

    async def _denied(self, exc: GatewayError) -> GatewayError:
        """Journal a denial; the error to raise (a dead session is a 401 before it is anything
        else: only denials pay for the look-up)."""
        denial = exc
        try:
            await require_live_session(self.deps, self.call.claims.session_id)
        except Unauthenticated as dead:
            denial = dead
        await self._journal_denial(denial)
        return denial

    async def _reserve(self) -> Admission:
        """Reserve the worst case and journal the request, in one round trip."""
        deps, call, est, tool = self.deps, self.call, self.estimate, self.tool
        subject = {"tool": tool.name} if tool is not None else {"model": self.grant.model.name, "stream": self.grant.stream}
        entry = make_entry(
            Kind.REQUEST, rid=call.request_id, asm=self.assembly.id,
            req_hash=call.request_hash, est_nanos=est.nanos, est_tokens=est.tokens,
            endpoint=call.endpoint.value, ts=int(time.time() * 1000),
            body=call.raw, compress_over=deps.settings.journal.compress_over_bytes, **subject,
        )
        try:
            return await deps.ledger.reserve(
                session_id=call.claims.session_id, tenant=call.claims.tenant, request_id=call.request_id,
                est_nanos=est.nanos, est_tokens=est.tokens, step_candidates=self._candidates(),
                limits=self.assembly.limits, entry=entry,
                idempotency_key=call.idempotency_record, request_hash=call.request_hash,
                capped=None if tool is None or tool.tool.max_calls is None else (f"mcp:{tool.tool.entry}", tool.tool.max_calls),
            )
        except StateConflict as exc:
            allowed = self._allowed_next(exc.extra.get("current_step"))
            denial = StateConflict(
                f"request fits no step allowed next; allowed: {', '.join(allowed) or 'none'}",
                code=exc.code, extra={**exc.extra, "allowed_steps": allowed},
            )
            await self._journal_denial(denial)
            raise denial from None
        except GatewayError as denial:
            if denial.status != 503:  # Redis is what failed: there is nowhere to journal it
                await self._journal_denial(denial)
            raise

    # -- running ------------------------------------------------------------------------

    async def send(self, wire: Wire | None = None) -> bytes:
        """One complete answer, checked by the output PEP and the plugins; its body.

        With a `wire`, the upstream is asked in the call's own dialect and its answer is
        passed on as it came (see gateway.pipeline.dialects); else in the grant's form.
        """
        if self.tool is not None:
            return await self._send_tool()
        started = time.perf_counter()
        endpoint, asked = (self.call.checked[0], self.grant.body) if wire is None else (wire.dialect.endpoint, wire.body)
        try:
            with self.deps.tracer.span("upstream"):
                reply = await self.provider.send(endpoint, asked, request_id=self.call.request_id)
        finally:
            self.upstream_s = time.perf_counter() - started
        self.upstream_headers = reply.headers
        data = self.answer_data = reply.data
        if wire is not None:
            usage = self._answer_usage = wire.usage(data, self.estimate.prompt_tokens, self.grant.model)
            policy.check_output(self.assembly, self.grant, wire.dialect.tool_names(data))
            self._outcome = _Outcome(Kind.RESPONSE, usage, reply.body, {})
            return reply.body
        choices = data.get("choices")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, dict) for c in choices)):
            raise UpstreamError("upstream answered with malformed choices")
        for choice in choices or []:
            if not isinstance(choice.get("message", {}), dict):
                raise UpstreamError("upstream answered with a malformed message")
        usage = self._answer_usage = reply_usage(data, self.estimate.prompt_tokens, self.grant.model)
        for choice in choices or []:
            message = choice.get("message")
            if message:
                policy.check_output(self.assembly, self.grant, policy.tool_call_names(message))
        rewritten = self.plugin_run.response(data) if self.plugin_run else None
        if rewritten is not None:
            self.answer_data = rewritten
        body = reply.body if rewritten is None else orjson.dumps(rewritten)
        self._outcome = _Outcome(Kind.RESPONSE, usage, body, {})
        return body

    def restate(self, body: bytes) -> None:
        """The client gets `body` instead of the answer `send` returned (its translation into
        the call's dialect); the journal keeps what the client gets."""
        assert self._outcome is not None
        self._outcome = dataclasses.replace(self._outcome, body=body)

    async def stream(self, translator: StreamTranslator | None = None) -> AsyncGenerator[bytes, None]:
        """The answer's payloads as the client should see them (one per SSE `data:` event).

        The upstream is asked for usage even when the client did not ask; that chunk is
        metered and dropped. Closing this iterator early closes the upstream call. With a
        `translator`, the payloads are the chunks translated into the call's dialect, and
        its closing events wait in `tail`.
        """
        body, client_wants_usage = _with_usage(self.grant.body)
        tokens: Tokens | None = None
        opened = False
        meter = self._meter = StreamMeter(self.grant.model, self.estimate.prompt_tokens)
        last: dict[str, Any] = {}
        started = time.perf_counter()
        upstream = self.provider.stream(
            self.call.checked[0], body, request_id=self.call.request_id, headers_out=self.upstream_headers,
        )
        try:
            # Current in this task from the call to its last chunk: the upstream gets its traceparent.
            with self.deps.tracer.span("upstream"):
                async for payload in upstream:
                    if self.ttft_s is None:
                        self.ttft_s = time.perf_counter() - started
                    chunk = last = _chunk(payload)
                    usage_only = meter.observe(chunk)
                    if meter.called:
                        policy.check_output(self.assembly, self.grant, meter.called)
                    if translator is not None:
                        tokens = chat_tokens(chunk.get("usage")) or tokens
                        if self.plugin_run and not usage_only:
                            chunk = self.plugin_run.chunk(chunk) or chunk
                        events = translator.feed(chunk)
                        if not opened:  # opened on the first chunk: an upstream refusal is still a JSON error
                            opened, events = True, [*translator.start(), *events]
                        for event in events:
                            self._payloads.append(orjson.dumps(event))
                            yield self._payloads[-1]
                        continue
                    if usage_only:
                        if not client_wants_usage:
                            continue  # asked for billing; the client did not ask
                    elif self.plugin_run:
                        rewritten = self.plugin_run.chunk(chunk)
                        if rewritten is not None:
                            chunk, payload = rewritten, orjson.dumps(rewritten)
                    if not client_wants_usage and "usage" in chunk:
                        payload = _without_usage(payload, chunk)
                    self._payloads.append(payload)
                    yield payload
            for owed in self.plugin_run.stream_end(last) if self.plugin_run else ():
                if translator is not None:
                    for event in translator.feed(owed):
                        self._payloads.append(orjson.dumps(event))
                        yield self._payloads[-1]
                    continue
                payload = orjson.dumps(owed)  # text a plugin held back, e.g. pii_redact's
                self._payloads.append(payload)
                yield payload
        finally:
            self.upstream_s = time.perf_counter() - started
            await upstream.aclose()
        ttft_us = None if self.ttft_s is None else int(self.ttft_s * 1e6)
        usage = meter.final_usage()
        if translator is not None:
            closing = translator.finish(tokens or Tokens(usage.prompt_tokens, usage.completion_tokens))
            self.tail = [orjson.dumps(event) for event in closing]
        self._outcome = _Outcome(
            Kind.STREAM, usage, b"\n".join([*self._payloads, *self.tail]),
            {"chunks": len(self._payloads) + len(self.tail), "ttft_us": ttft_us,
             "usage_from": "upstream" if meter.usage else "counted"},
        )

    async def stream_native(self, wire: Wire) -> AsyncGenerator[bytes, None]:
        """A stream from an upstream that speaks the call's dialect: its events as they came,
        checked by the output PEP and metered; the closing event waits in `tail`."""
        native = wire.dialect.meter()
        meter = self._meter = NativeUsage(native, self.estimate.prompt_tokens, self.grant.model)
        started = time.perf_counter()
        upstream = self.provider.stream(
            wire.dialect.endpoint, wire.body, request_id=self.call.request_id, headers_out=self.upstream_headers,
        )
        try:
            async for payload in upstream:
                if self.ttft_s is None:
                    self.ttft_s = time.perf_counter() - started
                meter.chunks += 1
                policy.check_output(self.assembly, self.grant, native.observe(_chunk(payload)))
                if native.complete:
                    self.tail.append(payload)
                    continue
                self._payloads.append(payload)  # as the upstream sent it, never re-serialised
                yield payload
        finally:
            self.upstream_s = time.perf_counter() - started
            await upstream.aclose()
        if not native.complete:
            raise UpstreamError("upstream stream ended early")
        ttft_us = None if self.ttft_s is None else int(self.ttft_s * 1e6)
        self._outcome = _Outcome(
            Kind.STREAM, meter.final_usage(), b"\n".join([*self._payloads, *self.tail]),
            {"chunks": len(self._payloads) + len(self.tail), "ttft_us": ttft_us,
             "usage_from": "upstream" if native.usage else "counted"},
        )

    # -- settlement ---------------------------------------------------------------------

    async def close(self, exc: BaseException | None = None, *, keep: Callable[[int], idempotency.Stored] | None = None) -> Settled:
        """Settle once: the answer when there is one and nothing failed, else the failure.
        Later calls return the first settlement. Runs shielded from cancellation. `keep`:
        a streamed answer as its client received it, given its cost, for retries with its
        Idempotency-Key (a complete one is kept as it is answered)."""
        if self._closing is None:
            work = self._settle_answer(keep) if exc is None and self._outcome is not None else self._settle_failure(exc)
            self._closing = asyncio.ensure_future(work)
            self.deps.tasks.add(self._closing)
            self._closing.add_done_callback(self.deps.tasks.discard)
        self.settled = await asyncio.shield(self._closing)
        return self.settled

    async def _settle_answer(self, keep: Callable[[int], idempotency.Stored] | None) -> Settled:
        outcome = self._outcome
        assert outcome is not None
        kept = None
        if self.call.idempotency_record is not None:
            # Kept in the settle step itself: no crash can part a charge from its answer.
            cost = charge(self.served_price, outcome.usage)
            if outcome.kind == Kind.RESPONSE:
                sent = {"content-type": "application/json", "x-request-id": self.call.request_id, **self.answer_headers(cost, -1)}
                kept = idempotency.Stored(200, sent, outcome.body, with_budget_left=True)
            elif keep is not None:
                kept = keep(cost)
        cost, left = await self._settle(
            outcome.kind, outcome.usage, advance=True, body=outcome.body, status=200, keep=kept, **outcome.extra, **self.extra,
        )
        gateway_s, usage = self.gateway_s, outcome.usage
        if self.plugin_run:
            await self.plugin_run.save_session(self.deps.redis, self.call.claims.session_id, self.call.claims.expires_at)
        if self.tool is not None:
            self._observe_tool(cost, "error_result" if outcome.extra.get("is_error") else "ok")
            return Settled(cost, left, entry_id=self._entry_id)
        self.deps.metrics.observe_settled(
            tenant=self.tenant, model=self.served.name, assembly_id=self.assembly.id,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cost_nanos=cost, gateway_s=gateway_s, upstream_s=self.upstream_s,
            genai=self._genai(), budget_left=left, ttft_s=self.ttft_s,
        )
        self.call.report.settled(
            model=self.served.name, tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens,
            cost_nanos=cost, gateway_s=gateway_s, upstream_s=self.upstream_s, ttft_s=self.ttft_s,
        )
        return Settled(cost, left, entry_id=self._entry_id)

    async def _settle_failure(self, exc: BaseException | None) -> Settled:
        error = as_gateway_error(exc)
        usage = self._usage_so_far()
        extra: dict[str, Any] = {}
        if self._meter is not None:
            extra = {"chunks": self._meter.chunks, "body": b"\n".join(self._payloads)}
        cost, left = await self._settle(
            Kind.ERROR, usage, advance=False, status=error.status, code=error.code, rule=error.extra.get("rule"),
            message=error.message, **extra,
        )
        if self.tool is not None:
            self._observe_tool(cost, error.code)
            return Settled(cost, left, error)
        self.deps.metrics.observe_failed(
            tenant=self.tenant, model=self.grant.model.name, assembly_id=self.assembly.id, code=error.code, cost_nanos=cost,
            genai=self._genai(), duration_s=time.perf_counter() - self.call.started,
        )
        self.call.report.settled(
            model=self.served.name, tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens,
            cost_nanos=cost, gateway_s=self.gateway_s, upstream_s=self.upstream_s, ttft_s=self.ttft_s, code=error.code,
        )
        return Settled(cost, left, error)  # its Idempotency-Key was freed in the settle step

    async def _settle(
        self, kind: str, usage: Usage, *, advance: bool, body: bytes | None = None,
        keep: idempotency.Stored | None = None, **fields: Any,
    ) -> tuple[int, int]:
        if self.failed_attempts:
            fields["attempts_failed"] = ",".join(self.failed_attempts)
        if self.tool is not None:
            # The frozen per-call price once the server answered, whatever its answer; else nothing.
            cost = self.tool.tool.price_nanos if self._tool_answered else 0
            tags = CostTags(self.tenant, self.call.claims.session_id, self.tool.cost_tag, self.assembly.id)
            fields["tool"] = self.tool.name
        else:
            cost, tags = self._model_cost(usage, fields), self._tags()
        entry = make_entry(
            kind, rid=self.call.request_id, asm=self.assembly.id,
            req_hash=self.call.request_hash, tok_in=usage.prompt_tokens, tok_out=usage.completion_tokens,
            cost_nanos=cost, gw_us=int(self.gateway_s * 1e6), up_us=int(self.upstream_s * 1e6),
            ts=int(time.time() * 1000), body=body, compress_over=self.deps.settings.journal.compress_over_bytes,
            plugins=self.plugin_run.counts(), **fields,
        )
        with self.deps.tracer.span("settle"):
            settlement = await self.deps.ledger.settle(
                session_id=self.call.claims.session_id, request_id=self.call.request_id, actual_nanos=cost,
                actual_tokens=usage.total, advance=advance, entry=entry, tags=tags, answer=keep,
            )
        self._entry_id = settlement.entry_id
        return cost, settlement.budget_left_nanos

    def _model_cost(self, usage: Usage, fields: dict[str, Any]) -> int:
        """A model call's cost at the frozen price of the model (or deployment) that served it;
        the journal fields saying which model, deployment and fallbacks served it go into `fields`."""
        served = self.served
        fields["model"] = self.grant.model.name
        if served is not self.grant.model:
            fields["served_by"] = served.name
        if isinstance(self.provider, FallbackChain) and self.provider.attempts:
            fields["fallbacks_failed"] = ",".join(f"{m}:{code}" for m, code in self.provider.attempts)
        deployment = self.served_deployment
        if deployment is not None:
            fields["deployment"] = deployment.label
        return charge(served.price_at(deployment), usage)

    def _usage_so_far(self) -> Usage:
        """What the upstream generated before the call failed: metered, or nothing."""
        if self._meter is not None:
            return self._meter.final_usage()
        return self._answer_usage or Usage(0, 0)

    # -- what callers read ---------------------------------------------------------------

    @property
    def served(self) -> ModelGrant:
        """The model that answered: the requested one, or a fallback of its frozen chain."""
        if isinstance(self.provider, FallbackChain):
            return self.provider.served
        if isinstance(self.provider, ReplayProvider) and self.provider.served_by:
            return self.assembly.models.get(self.provider.served_by, self.grant.model)
        return self.grant.model

    @property
    def served_deployment(self) -> Deployment | None:
        """Which of the serving model's deployments answered; None when it has none."""
        answered = self.provider
        if isinstance(answered, FallbackChain):
            answered = answered.served_provider or answered
        if isinstance(answered, Deployments):
            return answered.served
        if isinstance(answered, ReplayProvider) and answered.deployment:
            return self.served.deployment(answered.deployment)
        return None

    @property
    def served_price(self) -> FrozenPrice:
        """The frozen price this call is charged: the serving model's, or its deployment's own."""
        return self.served.price_at(self.served_deployment)

    @property
    def tenant(self) -> str:
        return self.call.claims.tenant or "default"

    @property
    def gateway_s(self) -> float:
        return time.perf_counter() - self.call.started - self.upstream_s

    @property
    def budget_left_at_admission(self) -> int:
        return self.admission.budget_left_nanos

    def answer_headers(self, cost: int | None, left: int) -> dict[str, str]:
        """The allow-listed upstream headers and ours: session, this call's cost, budget left."""
        headers = {**self.upstream_headers, "x-abc-session": self.call.claims.session_id, "x-abc-served-by": self.served.name}
        if cost is not None:
            headers["x-abc-cost-usd"] = nanos_to_usd_str(cost)
        if left >= 0:
            headers["x-abc-budget-remaining-usd"] = nanos_to_usd_str(left)
        return headers

    # -- helpers ------------------------------------------------------------------------

    def _provider_for(self, model: ModelGrant) -> Provider:
        if model.deployments:
            return Deployments(model, self.deps.providers, self.deps.balancer)
        return self.deps.providers[model.provider]

    def _genai(self) -> GenAI:
        return genai(self.call.endpoint.value, self.served.provider, self.grant.model.name, self.served.name)

    def _tags(self) -> CostTags:
        return CostTags(tenant=self.tenant, session_id=self.call.claims.session_id, model=self.served.name, assembly_id=self.assembly.id)

    async def _journal_denial(self, denial: GatewayError) -> None:
        deps, call = self.deps, self.call
        deps.metrics.observe_denial(denial)
        # Override fields (api_key, base_url, ...) are always denied, and may carry secrets.
        redacted = redact_overrides(call.body)
        body = call.raw if redacted == call.body else orjson.dumps(redacted)
        subject: dict[str, Any] = {}
        if call.endpoint is Endpoint.TOOLS_CALL:
            named = call.body.get("name")
            subject = {"endpoint": call.endpoint.value, "tool": named if isinstance(named, str) else None}
        entry = make_entry(
            Kind.DENIAL, rid=call.request_id, asm=self.assembly.id, req_hash=call.request_hash,
            status=denial.status, code=denial.code, rule=denial.extra.get("rule"), message=denial.message,
            ts=int(time.time() * 1000), body=body, compress_over=deps.settings.journal.compress_over_bytes, **subject,
        )
        await deps.ledger.append(call.claims.session_id, entry, extra=denial_tally(denial_reason(denial), time.time()))

    def _candidates(self) -> str:
        """Encode, for the reserve script, from which states each candidate step may run."""
        if not self.assembly.steps:
            return ""
        preds = self.assembly.predecessors
        # A candidate with no predecessors encodes as "id=" and can never match.
        steps = self.grant.candidate_steps if self.tool is None else self.tool.candidate_steps
        return ";".join(f"{sid}={','.join(preds.get(sid, []))}" for sid in steps) or "-="

    def _allowed_next(self, current: str | None) -> list[str]:
        if not current:
            return [self.assembly.steps[0].id] if self.assembly.steps else []
        step = self.assembly.step(current)
        return list(step.next) if step else []

    # -- MCP tool calls: the tool's pieces live in gateway.mcp (policy, provider) --------

    async def _admit_tool(self) -> tuple[ModelGrant, ...]:
        """A tools/call's grant (exact name, step, arguments vs the frozen input schema), the
        plugins that will read its result, and its frozen per-call price as the estimate."""
        deps, call = self.deps, self.call
        named = call.body.get("name")
        call.report.model = named if isinstance(named, str) else None
        with deps.tracer.span("pep"):
            try:
                self.tool = tool_policy.authorize_tool(self.assembly, call.body)
                await self._load_plugins(self.tool.candidate_steps)
            except GatewayError as exc:
                raise await self._denied(exc) from None
        self.estimate = Estimate(0, 0, self.tool.tool.price_nanos)
        return ()

    async def _send_tool(self) -> bytes:
        """The tool's provider (rug-pull check, then the server; or the recorded answer), then
        the result's checks: size, plugins, structured content vs the frozen output schema."""
        assert self.tool is not None
        started = time.perf_counter()
        try:
            with self.deps.tracer.span("upstream"):
                reply = await self.provider.send(Endpoint.TOOLS_CALL, self.call.body, request_id=self.call.request_id)
        finally:
            self.upstream_s = time.perf_counter() - started
        self._tool_answered = True  # the server did the work: charged, whatever the checks find
        limit = self.deps.tool_servers.result_limit(self.tool.tool.server)
        body = tool_policy.check_result(self.tool.tool, reply.data, reply.body, self.plugin_run, limit)
        self._outcome = _Outcome(Kind.RESPONSE, Usage(0, 0), body, {"is_error": reply.data.get("isError") is True})
        return body

    def _observe_tool(self, cost: int, outcome: str) -> None:
        assert self.tool is not None
        self.deps.metrics.observe_tool(
            self.tenant, self.assembly.id, self.tool.tool.server, self.tool.name, outcome, cost, self.gateway_s, self.upstream_s,
        )
        self.call.report.settled(
            model=self.tool.name, tokens_in=0, tokens_out=0, cost_nanos=cost, gateway_s=self.gateway_s,
            upstream_s=self.upstream_s, code=None if outcome in ("ok", "error_result") else outcome,
        )


def as_gateway_error(exc: BaseException | None) -> GatewayError:
    """The error a failed call is journaled and answered with."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ConnectionResetError):
        return ClientGone("client disconnected")
    if isinstance(exc, asyncio.CancelledError):
        return RequestCancelled("request cancelled")
    if exc is None:
        return RequestCancelled("request ended without an answer")
    # A bug (ours or a plugin's): journaled by class name only, never its text.
    return InternalError(f"internal error ({type(exc).__name__})")


async def journal_refusal(deps: Deps, claims: Claims, request_id: str, refusal: GatewayError) -> GatewayError:
    """A request refused before it became a call (a body that is not JSON, has duplicate
    keys, is too large or of another media type): journaled as a denial in the token's
    session. Nothing was reserved or sent. Returns the error to answer with: a dead
    session is a 401 before it is anything else."""
    try:
        await require_live_session(deps, claims.session_id)
    except Unauthenticated as dead:
        return dead
    deps.metrics.observe_denial(refusal)
    entry = make_entry(
        Kind.DENIAL, rid=request_id, asm=claims.assembly_id, status=refusal.status, code=refusal.code,
        param=refusal.param, message=refusal.message, ts=int(time.time() * 1000),
    )
    await deps.ledger.append(claims.session_id, entry)
    return refusal


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


_NULL_USAGE = b',"usage":null'


def _with_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body with include_usage forced on; and whether the client asked for it."""
    given = body.get("stream_options")
    options: dict[str, Any] = given if isinstance(given, dict) else {}
    return {**body, "stream_options": {**options, "include_usage": True}}, bool(options.get("include_usage"))


def _chunk(payload: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream sent a malformed stream chunk") from None
    if not isinstance(chunk, dict):
        raise UpstreamError("upstream sent a malformed stream chunk")
    return chunk


def _without_usage(payload: bytes, chunk: dict[str, Any]) -> bytes:
    """The chunk without the `usage` key we asked for, as the client would have had it.

    Upstreams send compact JSON with `"usage":null` on every chunk once asked; cutting
    those bytes out spares a re-serialisation per chunk. A quote inside a JSON string
    is escaped, so the pattern can only be a key; anything unusual is re-serialised.
    """
    if chunk.get("usage") is None and payload.count(_NULL_USAGE) == 1:
        return payload.replace(_NULL_USAGE, b"")
    return orjson.dumps({k: v for k, v in chunk.items() if k != "usage"})
