"""OpenTelemetry traces: a span per request, with children for each step of the request path,
named by the GenAI semantic conventions.

Off unless OpenTelemetry is configured through its standard variables (`OTEL_TRACES_EXPORTER`,
`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true`
wins), or a tracer provider is passed in (tests). When off, `Tracing.enabled` is False and the
request path skips every tracing call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider


def _configured_by_env() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter and exporter != "none":
        return True
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _provider_from_env() -> TracerProvider:
    """An SDK provider exporting over OTLP/HTTP; endpoint, headers and the service name all
    come from the standard OTEL_* variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "turnout")})
    provider = SdkTracerProvider(resource=resource)
    exporter = ConsoleSpanExporter() if os.environ.get("OTEL_TRACES_EXPORTER") == "console" else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """The gateway's tracer, or nothing at all when tracing is off."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        if provider is None and _configured_by_env():
            provider = _provider_from_env()
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("turnout") if provider is not None else None

    def extract(self, headers: Mapping[str, str]) -> Context | None:
        """The caller's trace context from W3C `traceparent`/`tracestate` headers."""
        return propagate.extract(headers) if self.enabled else None

    def span(self, name: str, parent: Span | None, **attributes: Any) -> Any:
        """A child step as a context manager (a no-op when tracing is off)."""
        if self._tracer is None or parent is None:
            return nullcontext(None)
        context = trace.set_span_in_context(parent)
        return self._tracer.start_as_current_span(name, context=context, attributes=attributes or None)

    def start_span(
        self, name: str, parent: Span | None, *, server: bool = False, context: Context | None = None, **attributes: Any
    ) -> Span | None:
        """A span the caller ends itself (one that outlives a `with` block: a stream). With
        `server`, the root span of a request, continuing `context` (the caller's trace)."""
        if self._tracer is None:
            return None
        if parent is not None:
            context = trace.set_span_in_context(parent)
        kind = SpanKind.SERVER if server else SpanKind.CLIENT
        return self._tracer.start_span(name, context=context, kind=kind, attributes=attributes or None)

    def record_span(self, name: str, parent: Span, start_ns: int, end_ns: int) -> None:
        """A child for a step timed before its parent existed (auth runs in middleware)."""
        if self._tracer is None:
            return
        child = self._tracer.start_span(name, context=trace.set_span_in_context(parent), start_time=start_ns)
        child.end(end_time=end_ns)

    @staticmethod
    def fail(span: Span | None, message: str) -> None:
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, message))

    def shutdown(self) -> None:
        shutdown = getattr(self.provider, "shutdown", None)
        if callable(shutdown):
            shutdown()


def trace_id_of(span: Span | None) -> str | None:
    """The span's trace id as 32 hex digits, for logs."""
    if span is None:
        return None
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
