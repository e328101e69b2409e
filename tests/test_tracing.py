"""Traces: one span per request over OTLP/HTTP, GenAI attributes, the client's trace continued."""

from __future__ import annotations

import httpx
from harness import Sim, Tenants, base_config, gateway, serving
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def _receiver() -> tuple[Starlette, list[ExportTraceServiceRequest]]:
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: Request) -> Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        received.append(message)
        return Response(b"", media_type="application/x-protobuf")

    return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])]), received


def _attrs(span: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in span.attributes:  # type: ignore[attr-defined]
        value = kv.value
        out[kv.key] = value.string_value or value.int_value or value.double_value
    return out


def test_one_span_per_request_with_genai_attributes(identity: Sim, tenants: Tenants) -> None:
    app, received = _receiver()
    key = tenants.key("team-a")
    with serving(app) as otlp:
        cfg = base_config({"swc": identity}, tenants, tracing={"otlp_endpoint": otlp.url})
        with gateway(cfg) as gw, httpx.Client(base_url=gw.url) as client:
            traced = {"api-key": key, "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
            r = client.post(
                "/openai/v1/responses", json={"model": "gpt-4.1", "input": "hi"}, headers=traced
            )
            usage, rid = r.json()["usage"], r.json()["id"]
            client.post(
                "/openai/v1/responses",
                json={"model": "gpt-4.1", "input": "x", "stream": True},
                headers={"api-key": key},
            )
            refused = client.post(
                "/openai/v1/responses", json={"model": "o3", "input": "x"}, headers={"api-key": key}
            )
            assert refused.status_code == 403
        # the gateway's shutdown flushes the batch
    spans = [
        s for m in received for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]
    assert len(spans) == 3
    first = spans[0]
    assert first.trace_id.hex() == TRACE_ID and first.parent_span_id.hex() == PARENT
    attrs = _attrs(first)
    assert attrs["gen_ai.operation.name"] == "create"
    assert attrs["gen_ai.request.model"] == "gpt-4.1"
    assert attrs["gen_ai.response.id"] == rid
    assert attrs["gen_ai.usage.input_tokens"] == usage["input_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["output_tokens"]
    assert attrs["gateway.tenant"] == "team-a" and attrs["gateway.resource"] == "swc"
    assert _attrs(spans[2])["error.type"] == "model_not_allowed"
    # upstream saw the trace continued by the gateway's own span
    sent = identity.state.api_requests()[0].headers["traceparent"]
    assert sent == f"00-{TRACE_ID}-{first.span_id.hex()}-01"
    resource = {
        kv.key: kv.value.string_value for kv in received[0].resource_spans[0].resource.attributes
    }
    assert resource["service.name"] == "azure-responses-gateway"


def test_tracing_is_off_by_default(gw: object, sim: Sim, tenants: Tenants) -> None:
    url = gw.url  # type: ignore[attr-defined]
    traceparent = f"00-{TRACE_ID}-{PARENT}-01"
    r = httpx.post(
        url + "/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "x"},
        headers={"api-key": tenants.key("team-a"), "traceparent": traceparent},
    )
    assert r.status_code == 200
    assert sim.state.api_requests()[-1].headers["traceparent"] == traceparent  # passed through
