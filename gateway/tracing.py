"""Request tracing: one span per request, children for the PEP, reserve, upstream and settle.

`Tracer` is the facade the request path calls (`with deps.tracer.span("pep"):`). Without
`otel.endpoint` it is a no-op that costs a method call, and opentelemetry is never imported;
with it, spans go to an OTLP/HTTP collector in batches, and `inject` adds the W3C
`traceparent` header to upstream calls. Spans follow the asyncio context, so settlement
running in a shielded task still lands under its request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from gateway.settings import OtelSettings

__all__ = ["NOOP", "OtelTracer", "Span", "Tracer", "build_tracer"]


class Span(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


class _NoSpan:
    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_NO_SPAN = _NoSpan()


class Tracer:
    """The unconfigured tracer: every method does nothing, cheaply."""

    def request(self, method: str, route: str) -> contextlib.AbstractContextManager[Span]:
        return _NO_SPAN

    def span(self, name: str) -> contextlib.AbstractContextManager[Span]:
        return _NO_SPAN

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """`headers`, plus `traceparent` for the current span when tracing."""
        return headers

    def shutdown(self) -> None:
        pass


NOOP = Tracer()


class OtelTracer(Tracer):
    """Spans exported over OTLP/HTTP (protobuf) by opentelemetry-sdk's batch processor."""

    def __init__(self, settings: OtelSettings) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.propagate import inject
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind

        assert settings.endpoint is not None
        # Our own provider, not the global one: an embedding app's tracing stays its own.
        self._provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint), schedule_delay_millis=500))
        self._tracer = self._provider.get_tracer("abc-gateway")
        self._inject = inject
        self._server = SpanKind.SERVER

    @contextlib.contextmanager
    def request(self, method: str, route: str) -> Iterator[Span]:
        attributes = {"http.request.method": method, "http.route": route}
        with self._tracer.start_as_current_span(f"{method} {route}", kind=self._server, attributes=attributes) as span:
            yield span

    def span(self, name: str) -> contextlib.AbstractContextManager[Span]:
        return self._tracer.start_as_current_span(name)

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        carrier = dict(headers)
        self._inject(carrier)
        return carrier

    def shutdown(self) -> None:
        self._provider.shutdown()  # flushes what the batch holds


def build_tracer(settings: OtelSettings) -> Tracer:
    return OtelTracer(settings) if settings.endpoint else NOOP
