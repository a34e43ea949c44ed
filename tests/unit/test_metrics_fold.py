"""Per-request observations are added up and folded into the registry in batches
(gateway.metrics): a scrape sees exactly what prometheus-client would have recorded
observation by observation, bucket boundaries included."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import FOLD_AT, Metrics
from tests.metrics_support import counter

GENAI = ("chat", "openai", "gpt-4o-mini", "gpt-4o-mini")


def settle(metrics: Metrics, gateway_s: float, tokens: int) -> None:
    metrics.request_started()
    metrics.observe_settled(
        tenant="acme", model="gpt-4o-mini", assembly_id="asm_1", prompt_tokens=tokens, completion_tokens=tokens + 1,
        cost_nanos=1000 * tokens, gateway_s=gateway_s, upstream_s=0.02, genai=GENAI, budget_left=5000 - tokens,
    )
    metrics.observe_request("/v1/chat/completions", 200, gateway_s + 0.02)


def test_a_scrape_sees_the_same_buckets_sums_and_counters_as_direct_observation() -> None:
    metrics = Metrics()
    # Values on bucket bounds (le is inclusive), between them, and past the last one.
    overheads = [0.0001, 0.00011, 0.001, 0.0009, 0.5, 0.1, 0.0]
    for i, seconds in enumerate(overheads):
        settle(metrics, seconds, tokens=i)
    text = metrics.render().decode()

    reference = CollectorRegistry()
    direct = Histogram("abc_gateway_overhead_seconds", "x", buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1), registry=reference)
    for seconds in overheads:
        direct.observe(seconds)
    expected = generate_latest(reference).decode()
    for line in expected.splitlines():
        if line.startswith("abc_gateway_overhead_seconds_bucket") or line.startswith("abc_gateway_overhead_seconds_count"):
            assert line in text
    assert counter(text, "abc_gateway_overhead_seconds_sum") == sum(overheads)

    assert counter(text, "abc_tokens_total", direction="input") == sum(range(len(overheads)))
    assert counter(text, "abc_tokens_total", direction="output") == sum(range(1, len(overheads) + 1))
    assert counter(text, "abc_cost_nanos_total", tenant="acme") == 1000 * sum(range(len(overheads)))
    assert counter(text, "abc_requests_total", route="/v1/chat/completions", status="200") == len(overheads)
    assert counter(text, "abc_budget_remaining_nanos", tenant="acme") == 5000 - (len(overheads) - 1)  # the latest
    assert counter(text, "gen_ai_client_token_usage_count", gen_ai_token_type="output") == len(overheads)
    assert counter(text, "abc_requests_in_flight") == 0


def test_requests_in_flight_are_counted_until_they_are_answered() -> None:
    metrics = Metrics()
    metrics.request_started()
    metrics.request_started()
    assert counter(metrics.render().decode(), "abc_requests_in_flight") == 2
    metrics.observe_request("/v1/embeddings", 200, 0.01)
    assert counter(metrics.render().decode(), "abc_requests_in_flight") == 1


def test_pending_observations_are_folded_without_a_scrape_once_enough_requests_end() -> None:
    metrics = Metrics()
    for _ in range(FOLD_AT - 1):
        settle(metrics, 0.001, tokens=1)
    assert metrics.requests.labels("/v1/chat/completions", "200")._value.get() == 0  # still pending
    settle(metrics, 0.001, tokens=1)
    assert metrics.requests.labels("/v1/chat/completions", "200")._value.get() == FOLD_AT
