"""Every Prometheus metric, in one place, on a registry owned by the app (not global)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

if TYPE_CHECKING:
    from gateway.errors import GatewayError

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("abc_requests", "HTTP requests", ["route", "status"], registry=r)
        self.duration = Histogram("abc_request_duration_seconds", "Request latency", ["route"], buckets=_SLOW, registry=r)
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
        self.overload = Counter("abc_overload_refusals", "Requests or connections refused past a cap", ["what"], registry=r)
        self.plugin = Histogram("abc_plugin_seconds", "Time in one policy plugin hook", ["plugin", "hook"], buckets=_FAST, registry=r)

        # labels() hashes and locks on every call; a request touches half a dozen children.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values)
        return child

    def observe_journal_write(self, op: str, seconds: float) -> None:
        self._child(self.journal_write, op).observe(seconds)

    def observe_overload(self, what: str) -> None:
        self._child(self.overload, what).inc()

    def observe_plugin(self, plugin: str, hook: str, seconds: float) -> None:
        self._child(self.plugin, plugin, hook).observe(seconds)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, str(status)).inc()
        self._child(self.duration, route).observe(seconds)

    def observe_settled(
        self, *, tenant: str, model: str, assembly_id: str, prompt_tokens: int, completion_tokens: int,
        cost_nanos: int, gateway_s: float, upstream_s: float,
    ) -> None:
        self.overhead.observe(gateway_s)
        self._child(self.upstream, model).observe(upstream_s)
        self._child(self.tokens, tenant, model, "input").inc(prompt_tokens)
        self._child(self.tokens, tenant, model, "output").inc(completion_tokens)
        self._child(self.cost, tenant, model, assembly_id).inc(cost_nanos)

    def observe_failed(self, *, tenant: str, model: str, assembly_id: str, code: str, cost_nanos: int) -> None:
        self._child(self.upstream_errors, model, code).inc()
        if cost_nanos:
            self._child(self.cost, tenant, model, assembly_id).inc(cost_nanos)

    def observe_attempt(self, provider: str, outcome: str) -> None:
        self._child(self.upstream_attempts, provider, outcome).inc()

    def observe_tool(
        self, tenant: str | None, assembly: str, server: str, tool: str, outcome: str, cost: int,
        gateway_s: float, upstream_s: float,
    ) -> None:
        """One settled MCP tool call; its spend joins the models' under model="mcp:<server>__<tool>"."""
        self._child(self.tool_calls, server, tool, outcome).inc()
        if cost:
            self._child(self.cost, tenant or "default", "mcp:" + tool, assembly).inc(cost)
        if outcome in ("ok", "error_result"):
            self.overhead.observe(gateway_s)
            self._child(self.upstream, "mcp:" + tool).observe(upstream_s)

    def observe_denial(self, exc: GatewayError) -> None:
        self.denials.labels(str(exc.extra.get("rule") or exc.code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
