"""OTLP traces: spans a real gateway exports to a small OTLP/HTTP collector on loopback,
decoded with opentelemetry-proto; `traceparent` reaches the upstream."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gateway.capability import Keyring
from gateway.settings import ModelSettings, OtelSettings, Price, ProviderSettings
from tests.conftest import make_settings, start_gateway
from tests.fakes.upstream import FakeUpstream

PLAN: dict[str, Any] = {
    "name": "trace-test",
    "tenant": "acme",
    "models": [{"name": "up-model", "max_tokens": 32}],
    "budget": {"usd": 1.0},
}


class Collector:
    """Accepts OTLP/HTTP protobuf trace exports at /v1/traces and keeps the spans."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.content_types: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _traces(self, request: web.Request) -> web.Response:
        self.content_types.add(request.content_type)
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def __aenter__(self) -> Collector:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/v1/traces"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with Collector() as running:
        yield running


async def test_a_request_is_one_span_with_pep_reserve_upstream_and_settle_under_it(
    collector: Collector, redis_url: str, keyring: Keyring
) -> None:
    async with FakeUpstream() as fake:
        settings = make_settings(
            providers=[ProviderSettings(name="up", kind="openai", api_base=fake.base_url)],
            models=[ModelSettings(name="up-model", provider="up", price=Price(input_per_mtok=1, output_per_mtok=2))],
            otel=OtelSettings(endpoint=collector.url),
        )
        gw = start_gateway(settings, redis_url, keyring)
        try:
            token = gw.token(PLAN)
            async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
                body = {"model": "up-model", "messages": [{"role": "user", "content": "hi"}]}
                response = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.text
        finally:
            await asyncio.to_thread(gw.close)  # shutting down flushes the spans to the collector
        traceparent = fake.last_request.headers["traceparent"]

    assert collector.content_types == {"application/x-protobuf"}
    roots = [s for s in collector.spans if s.name == "POST /v1/chat/completions"]
    assert len(roots) == 1
    root = roots[0]
    assert root.parent_span_id == b"" and root.kind == Span.SpanKind.SPAN_KIND_SERVER
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["http.route"].string_value == "/v1/chat/completions"
    assert attributes["http.response.status_code"].int_value == 200
    children = {s.name: s for s in collector.spans if s.trace_id == root.trace_id and s.span_id != root.span_id}
    assert set(children) == {"pep", "reserve", "upstream", "settle"}
    for child in children.values():
        assert child.parent_span_id == root.span_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano
    ordered = sorted(children.values(), key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in ordered] == ["pep", "reserve", "upstream", "settle"]
    # W3C trace context: version, trace id, the upstream span as parent, flags with "sampled" set.
    version, trace_id, parent_id, flags = traceparent.split("-")
    assert (version, trace_id, parent_id) == ("00", root.trace_id.hex(), children["upstream"].span_id.hex())
    assert int(flags, 16) & 1


def test_the_tracing_sdk_and_exporter_are_not_imported_without_an_endpoint() -> None:
    # redis-py imports opentelemetry's metrics API by itself when it is installed; the tracing
    # SDK, the propagators and the OTLP exporter are ours to import, and only with an endpoint.
    code = "\n".join((
        "import sys",
        "import gateway.app, gateway.cli, gateway.server",
        "from gateway.settings import OtelSettings",
        "from gateway.tracing import build_tracer",
        "with build_tracer(OtelSettings()).span('pep'):",
        "    pass",
        "ours = ('opentelemetry.sdk.trace', 'opentelemetry.exporter', 'opentelemetry.propagat')",
        "print(sorted(m for m in sys.modules if m.startswith(ours)))",
    ))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
