"""Optional OpenTelemetry spans per exchange, with the GenAI semantic conventions.

On only when ``tracing.otlp_endpoint`` is set (the observer is not even created
otherwise): one SERVER span per request, continuing the client's ``traceparent``; its own
context is what goes upstream as ``traceparent``. Attributes: ``gen_ai.operation.name``,
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.id``,
``gen_ai.usage.input_tokens`` / ``output_tokens``, plus tenant, resource, deployment,
status. Exported over OTLP/HTTP (protobuf) in batches by the OpenTelemetry SDK
(``pip install 'azure-responses-gateway[tracing]'``).
"""

from __future__ import annotations

import time
from typing import Any

from .config import TracingConfig
from .exchange import BaseObserver, Exchange


class Tracing(BaseObserver):
    """Starts a span when an exchange starts, finishes it when the exchange does."""

    def __init__(self, cfg: TracingConfig) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert cfg.otlp_endpoint is not None
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBasedTraceIdRatio(cfg.sample_ratio),
        )
        exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint.rstrip("/") + "/v1/traces")
        self._provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self._tracer = self._provider.get_tracer("azure-responses-gateway")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)

    def started(self, ex: Exchange) -> None:
        carrier = {"traceparent": ex.traceparent} if ex.traceparent else {}
        context = self._propagator.extract(carrier)
        span = self._tracer.start_span(
            ex.operation, context=context, kind=self._kind, start_time=time.time_ns()
        )
        ex.span = span
        ctx = span.get_span_context()
        if ctx.is_valid:
            ex.traceparent_out = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"

    def finished(self, ex: Exchange) -> None:
        span: Any = ex.span
        if span is None:
            return
        t = ex.target
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": ex.operation,
            "gen_ai.provider.name": "azure.ai.openai",
            "http.request.method": ex.method,
            "http.response.status_code": ex.status,
            "gateway.tenant": ex.tenant or "",
            "gateway.request_id": ex.request_id,
        }
        if ex.model:
            attrs["gen_ai.request.model"] = ex.model
        if t is not None:
            attrs["gateway.resource"] = t.resource
            attrs["azure.region"] = t.region
            if t.deployment:
                attrs["gateway.deployment"] = t.deployment
        if ex.response_id:
            attrs["gen_ai.response.id"] = ex.response_id
        kinds = ex.usage_kinds()
        if kinds is not None:
            attrs["gen_ai.usage.input_tokens"] = kinds["input"]
            attrs["gen_ai.usage.output_tokens"] = kinds["output"]
        elif ex.estimated_tokens:
            attrs["gateway.estimated_tokens"] = ex.estimated_tokens
        if ex.cost is not None:
            attrs["gateway.cost"] = ex.cost
            attrs["gateway.currency"] = ex.currency or ""
        if ex.error_code:
            attrs["error.type"] = ex.error_code
        span.set_attributes(attrs)
        if ex.status >= 500 or ex.status == 0:
            span.set_status(self._error)
        span.end()

    def shutdown(self) -> None:
        """Flush what is batched and stop exporting."""
        self._provider.shutdown()
