"""Every Prometheus metric, in one place, on a registry owned by the app (not global).

With `serve --workers N` the parent points PROMETHEUS_MULTIPROC_DIR at a fresh directory
before the workers start: each worker's values live in files there, and any worker's
/metrics reports the sum over all of them (prometheus-client's multiprocess mode).

A request makes about a dozen observations. Through prometheus-client each is a call
chain, a lock and, for a histogram, a walk over its buckets: a tenth of the gateway's
Python work per request. So the per-request observations are added up in plain dicts
(a sum and a bucket count per child) and folded into the registry in one pass: before
every scrape, and once 256 requests are pending. In multiprocess mode another worker's
scrape reads this one's files, so there each request's observations are folded at once.

Labels stay bounded: tenant, model, Assembly, route, reason, code; never a session or
request id. The GenAI semantic-convention metrics carry their OpenTelemetry names with the
dots as underscores and the unit as a suffix, as Prometheus translates OTLP names
(`gen_ai.server.request.duration` -> `gen_ai_server_request_duration_seconds`).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from gateway.errors import GatewayError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Bucket boundaries the GenAI semantic conventions advise.
_GENAI_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_GENAI_DURATION = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_GENAI_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_GENAI_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_GENAI = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model"]
# gen_ai.operation.name, gen_ai.provider.name, gen_ai.request.model, gen_ai.response.model
GenAI = tuple[str, str, str, str]
# gen_ai.operation.name by endpoint (see gateway.providers.base.Endpoint).
FOLD_AT = 256  # requests' observations pending before they are folded into the registry
_Key = tuple[Any, tuple[str, ...]]  # (metric, label values)
OPERATIONS = {"chat/completions": "chat", "completions": "text_completion", "embeddings": "embeddings"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        r = self.registry
        self.requests = Counter("abc_requests", "HTTP requests", ["route", "status"], registry=r)
        self.duration = Histogram("abc_request_duration_seconds", "Request latency", ["route"], buckets=_SLOW, registry=r)
        self.in_flight = Gauge("abc_requests_in_flight", "Requests being served", registry=r, multiprocess_mode="livesum")
        self.overhead = Histogram("abc_gateway_overhead_seconds", "Time spent in the gateway, upstream excluded", buckets=_FAST, registry=r)
        self.upstream = Histogram("abc_upstream_duration_seconds", "Upstream latency", ["model"], buckets=_SLOW, registry=r)
        self.tokens = Counter("abc_tokens", "Tokens", ["tenant", "model", "direction"], registry=r)
        self.cost = Counter("abc_cost_nanos", "Spend in nano-dollars", ["tenant", "model", "assembly"], registry=r)
        self.denials = Counter("abc_denials", "Denied requests", ["reason"], registry=r)
        self.journal_write = Histogram("abc_journal_write_seconds", "Redis round trip of a budget script and its journal entry", ["op"], buckets=_FAST, registry=r)
        self.upstream_errors = Counter("abc_upstream_errors", "Upstream failures", ["model", "code"], registry=r)
        self.upstream_attempts = Counter(
            "abc_upstream_attempts", "Upstream attempts by outcome: ok, retried, failed, refused", ["provider", "outcome"], registry=r,
        )
        self.tool_calls = Counter("abc_tool_calls", "MCP tool calls admitted, by outcome", ["server", "tool", "outcome"], registry=r)
        self.ledger_events = Counter(
            "abc_ledger_events", "Requests closed for a dead owner (taken_over, reaped_zero), past their TTL "
            "(reaped_full), or settled after Redis came back (settle_deferred)", ["event"], registry=r,
        )
        self.settle_backlog = Gauge("abc_settle_backlog", "Settlements waiting for Redis to come back", registry=r)
        self.redis_errors = Counter("abc_redis_errors", "Redis failures (requests refused with 503, reaper passes skipped)", ["where"], registry=r)
        self.budget_remaining = Gauge(
            "abc_budget_remaining_nanos", "USD budget left in the tenant's most recently settled session",
            ["tenant"], registry=r, multiprocess_mode="mostrecent",
        )
        # For MCP tool calls (see observe_tool): bounded by the servers and tools plans name.
        self.tool_cost = Counter("abc_tool_cost_nanos", "Tool-call spend in nano-dollars", ["tenant", "server", "tool"], registry=r)
        self.reaped = Counter("abc_reaper_settlements", "Reservations a crashed replica left, settled by the reaper", registry=r)

        self.genai_tokens = Histogram("gen_ai_client_token_usage", "gen_ai.client.token.usage: tokens per call", [*_GENAI, "gen_ai_token_type"], buckets=_GENAI_TOKENS, registry=r)
        self.genai_duration = Histogram("gen_ai_server_request_duration_seconds", "gen_ai.server.request.duration", [*_GENAI, "error_type"], buckets=_GENAI_DURATION, registry=r)
        self.genai_ttft = Histogram("gen_ai_server_time_to_first_token_seconds", "gen_ai.server.time_to_first_token", _GENAI, buckets=_GENAI_TTFT, registry=r)
        self.genai_tpot = Histogram("gen_ai_server_time_per_output_token_seconds", "gen_ai.server.time_per_output_token", _GENAI, buckets=_GENAI_TPOT, registry=r)
        self.overload = Counter("abc_overload_refusals", "Requests or connections refused past a cap", ["what"], registry=r)
        self.plugin = Histogram("abc_plugin_seconds", "Time in one policy plugin hook", ["plugin", "hook"], buckets=_FAST, registry=r)

        # labels() hashes and locks on every call; a request touches half a dozen children.
        self._children: dict[_Key, Any] = {}
        # Observations not folded into the registry yet (see the module's docstring).
        self._bounds = {m: (*m._upper_bounds,) for m in (
            self.duration, self.overhead, self.upstream, self.journal_write, self.genai_tokens, self.genai_duration,
            self.genai_ttft, self.genai_tpot,
        )}
        self._sums: dict[_Key, float] = {}  # a counter's increments, a histogram's observed total
        self._counts: dict[tuple[Any, tuple[str, ...], int], int] = {}  # (metric, labels, bucket) -> observations
        self._last: dict[_Key, float] = {}  # a gauge's latest value
        self._pending = 0
        self._fold_at = 1 if self.multiprocess else FOLD_AT
        self.in_flight_now = 0  # requests being served; the gauge is set from it when folded

    def _child(self, metric: Any, *values: str) -> Any:
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values) if values else metric
        return child

    def count_ledger_event(self, event: str) -> None:
        self._child(self.ledger_events, event).inc()

    def watch_settle_backlog(self, size: Callable[[], int]) -> None:
        self.settle_backlog.set_function(size)

    def observe_journal_write(self, op: str, seconds: float) -> None:
        self._observe(self.journal_write, (op,), seconds)

    def observe_overload(self, what: str) -> None:
        self._child(self.overload, what).inc()

    def observe_plugin(self, plugin: str, hook: str, seconds: float) -> None:
        self._child(self.plugin, plugin, hook).observe(seconds)

    def request_started(self) -> None:
        self.in_flight_now += 1
        if self.multiprocess:  # other workers' scrapes read it from this one's file
            self.in_flight.set(self.in_flight_now)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """A request answered: the end of its observations, which may now be folded."""
        self.in_flight_now -= 1
        self._inc(self.requests, (route, str(status)), 1)
        self._observe(self.duration, (route,), seconds)
        self._pending += 1
        if self._pending >= self._fold_at:
            self.fold()

    def observe_settled(
        self, *, tenant: str, model: str, assembly_id: str, prompt_tokens: int, completion_tokens: int,
        cost_nanos: int, gateway_s: float, upstream_s: float, genai: GenAI | None = None,
        budget_left: int = -1, ttft_s: float | None = None,
    ) -> None:
        observe, inc = self._observe, self._inc
        observe(self.overhead, (), gateway_s)
        observe(self.upstream, (model,), upstream_s)
        inc(self.tokens, (tenant, model, "input"), prompt_tokens)
        inc(self.tokens, (tenant, model, "output"), completion_tokens)
        inc(self.cost, (tenant, model, assembly_id), cost_nanos)
        if budget_left >= 0:
            self._last[(self.budget_remaining, (tenant,))] = budget_left
        if genai is None:
            return
        observe(self.genai_tokens, (*genai, "input"), prompt_tokens)
        if completion_tokens:
            observe(self.genai_tokens, (*genai, "output"), completion_tokens)
        observe(self.genai_duration, (*genai, ""), gateway_s + upstream_s)
        if ttft_s is not None:
            observe(self.genai_ttft, genai, ttft_s)
            if completion_tokens > 1:
                observe(self.genai_tpot, genai, max(upstream_s - ttft_s, 0.0) / (completion_tokens - 1))

    def observe_failed(
        self, *, tenant: str, model: str, assembly_id: str, code: str, cost_nanos: int,
        genai: GenAI | None = None, duration_s: float = 0.0,
    ) -> None:
        self._child(self.upstream_errors, model, code).inc()
        if genai is not None:
            self._child(self.genai_duration, *genai, code).observe(duration_s)
        if cost_nanos:
            self._child(self.cost, tenant, model, assembly_id).inc(cost_nanos)

    def observe_attempt(self, provider: str, outcome: str) -> None:
        self._inc(self.upstream_attempts, (provider, outcome), 1)

    def observe_reaped(self, count: int) -> None:
        self.reaped.inc(count)

    def observe_redis_error(self, where: str) -> None:
        self._child(self.redis_errors, where).inc()

    def observe_tool(
        self, tenant: str | None, assembly: str, server: str, tool: str, outcome: str, cost: int,
        gateway_s: float, upstream_s: float,
    ) -> None:
        """One settled MCP tool call; its spend joins the models' under model="mcp:<server>__<tool>"."""
        self._child(self.tool_calls, server, tool, outcome).inc()
        if cost:
            self._child(self.cost, tenant or "default", "mcp:" + tool, assembly).inc(cost)
            self._child(self.tool_cost, tenant or "default", server, tool).inc(cost)
        if outcome in ("ok", "error_result"):
            self.overhead.observe(gateway_s)
            self._child(self.upstream, "mcp:" + tool).observe(upstream_s)

    def observe_denial(self, exc: GatewayError) -> None:
        self._child(self.denials, denial_reason(exc)).inc()

    def _inc(self, counter: Any, labels: tuple[str, ...], amount: float) -> None:
        key = (counter, labels)
        self._sums[key] = self._sums.get(key, 0) + amount

    def _observe(self, histogram: Any, labels: tuple[str, ...], value: float) -> None:
        key = (histogram, labels)
        self._sums[key] = self._sums.get(key, 0) + value
        # prometheus-client's bucket: the first whose upper bound is >= the value.
        bucket = (histogram, labels, bisect_left(self._bounds[histogram], value))
        self._counts[bucket] = self._counts.get(bucket, 0) + 1

    def fold(self) -> None:
        """Add the pending observations to the registry's values."""
        sums, counts, last = self._sums, self._counts, self._last
        self._sums, self._counts, self._last, self._pending = {}, {}, {}, 0
        for (metric, labels), total in sums.items():
            child = self._child(metric, *labels)
            if metric in self._bounds:
                child._sum.inc(total)  # a histogram's sum; its buckets follow
            else:
                child.inc(total)
        for (metric, labels, bucket), n in counts.items():
            self._child(metric, *labels)._buckets[bucket].inc(n)
        for (metric, labels), value in last.items():
            self._child(metric, *labels).set(value)
        self.in_flight.set(self.in_flight_now)

    def _collected(self) -> CollectorRegistry:
        """This process's registry, or in multiprocess mode one summing every worker's files."""
        self.fold()
        if not self.multiprocess:
            return self.registry
        from prometheus_client import multiprocess

        merged = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # prometheus-client leaves it untyped
        return merged

    def render(self) -> bytes:
        return generate_latest(self._collected())

    def overhead_quantiles(self, *qs: float) -> tuple[int, list[float | None]]:
        """(count, quantiles in seconds) of the gateway-overhead histogram since start, over
        all workers; interpolated within buckets as PromQL's histogram_quantile does."""
        buckets: dict[float, float] = {}
        for family in self._collected().collect():
            if family.name == "abc_gateway_overhead_seconds":
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        le = float(sample.labels["le"])
                        buckets[le] = buckets.get(le, 0.0) + sample.value
        bounds = sorted(buckets)
        total = buckets.get(float("inf"), 0.0)
        return int(total), [_quantile(q, bounds, buckets, total) for q in qs]


def _quantile(q: float, bounds: list[float], cumulative: dict[float, float], total: float) -> float | None:
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower  # past the last finite bucket: its bound is all we know
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def denial_reason(exc: GatewayError) -> str:
    """The PEP rule that denied, else the error code: the denial metrics' and tallies' label."""
    return str(exc.extra.get("rule") or exc.code)


def genai(endpoint: str, provider: str, model: str, served_by: str | None = None) -> GenAI:
    """The gen_ai.* attributes of one call: operation, provider, requested and serving model."""
    return OPERATIONS.get(endpoint, endpoint), provider, model, served_by or model
