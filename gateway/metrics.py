"""Prometheus collectors, fed by the exchange observer hooks.

Label values are bounded: tenants and models come from the config (anything
else is ``other``), resources and regions likewise, statuses are numbers.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from .config import Config
from .exchange import BaseObserver, Exchange
from .routing import Target

OTHER = "other"
# How prometheus_client writes a bucket bound (``1.0``, ``1.048576e+06``), so the ``le``
# values, and so dashboards, are the same as with its own Histogram.
_go_float: Callable[[float], str] = floatToGoString
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFB = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class _CountChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: ``le``


class _Family:
    """A counter, gauge or histogram of the request path whose children are plain numbers.

    prometheus_client guards every value with a lock (an observe takes two, plus its
    checks): correct for many writing threads, pure cost here, where the event loop is
    the only writer. A scrape may run on another thread (``metrics.port`` serves from
    one): it reads a snapshot of the children, taken in one step under the GIL, so a
    label set added meanwhile cannot break it. Exposition is the same (``_total``,
    ``_bucket`` with the same ``le`` values, ``_sum``, ``_count``), without the
    ``_created`` series.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: tuple[float, ...] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._le = [_go_float(b) for b in self.bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._unlabelled = self.labels()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = _HistogramChild(self.bounds) if self.kind == "histogram" else _CountChild()
            self._children[values] = child
        return child

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled.value -= amount

    def describe(self) -> Iterable[Metric]:
        return self._collect(with_samples=False)

    def collect(self) -> Iterable[Metric]:
        return self._collect(with_samples=True)

    def _collect(self, with_samples: bool) -> Iterable[Metric]:
        # dict.copy is one C call that runs no Python code (no collection, no switch);
        # iterating the live dict, or list(items()), can be interleaved with an insert.
        children = self._children.copy().items() if with_samples else {}.items()
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for values, child in children:
                cumulative, buckets = 0, []
                for le, n in zip(self._le, child.counts, strict=True):
                    cumulative += n
                    buckets.append((le, cumulative))
                histogram.add_metric(list(values), buckets, child.sum)
            yield histogram
            return
        kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = kind(self.name, self.documentation, labels=self.labelnames)
        for values, child in children:
            family.add_metric(list(values), child.value)
        yield family


def reference(registry: CollectorRegistry) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(name, type, labels, help) of every metric on ``registry``, as exposed."""
    rows = []
    for collector in list(registry._collector_to_names):
        if isinstance(collector, _Family):
            rows.append(
                (
                    collector.name,
                    collector.kind,
                    tuple(collector.labelnames),
                    collector.documentation,
                )
            )
        elif hasattr(collector, "_labelnames"):  # prometheus_client's Counter, Gauge
            metric: Any = collector
            kind = metric._type
            name = metric._name + ("_total" if kind == "counter" else "")
            rows.append((name, kind, tuple(metric._labelnames), metric._documentation))
        else:  # a collector read at scrape time
            for family in collector.collect():
                labels = tuple(getattr(family, "_labelnames", ()))
                rows.append((family.name, family.type, labels, family.documentation))
    return rows


METRICS_HEADER = """# Metrics

Exposed on `/metrics` (or on `metrics.port`, then not on the API port). Label values are
bounded: `tenant` and `model` are configured names or `other`; `operation` is an operation
of the endpoint table or `unknown`; `server_label` is the first 100 sane labels seen, then
`other`; `key_id` is a configured or runtime key's id.

The metrics every request touches (requests, durations, time to first byte, tokens, cost,
in-flight and stream gauges and the GenAI histograms) are kept as plain numbers, not
prometheus_client's locked values: the event loop is their only writer. Their exposition
is the same (`_total`, `_bucket` with the same `le` bounds, `_sum`, `_count`) except that
they have no `_created` series.

`deploy/grafana/dashboard.json` and `deploy/grafana/alerts.yaml` query only these; a test
checks that every series they use is exposed.

This page is generated from the metric registry (`gateway.metrics.markdown`; a test keeps
it equal).

| metric | type | labels | meaning |
|---|---|---|---|
"""


def markdown() -> str:
    """docs/metrics.md: every metric a gateway exposes."""
    from .config import parse_config

    cfg = parse_config({"resources": {}, "models": {}, "tenants": {}}, {}).config
    metrics = Metrics(lambda: cfg)
    metrics.watch_keys({})
    lines = [
        f"| `{name}` | {kind} | {', '.join(labels) or '—'} | {doc} |"
        for name, kind, labels, doc in reference(metrics.registry)
    ]
    return METRICS_HEADER + "\n".join(lines) + "\n"


class _Budgets:
    """``gateway_budget``: the money budgets of the current config (read at scrape)."""

    def __init__(self, config_source: Callable[[], Config]) -> None:
        self._config = config_source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gateway_budget",
            "Money budgets from the config, by tenant, model ('' tenant-wide), period, currency.",
            labels=["tenant", "model", "period", "currency"],
        )
        for tenant, t in self._config().tenants.items():
            b = t.budgets
            if b is None:
                continue
            limits = [("", b), *b.models.items()]
            for model, limit in limits:
                for period, amount in (("day", limit.per_day), ("month", limit.per_month)):
                    if amount:
                        family.add_metric([tenant, model, period, b.currency], amount)
        yield family


class Metrics(BaseObserver):
    """All gateway metrics on their own registry (one per app, so tests don't collide)."""

    def __init__(self, config_source: Callable[[], Config]) -> None:
        self._config = config_source
        r = self.registry = CollectorRegistry()
        self.requests = _Family(
            "counter",
            "gateway_requests_total",
            "Requests answered, by tenant, model, operation, status and transport"
            " (http, websocket).",
            ["tenant", "model", "operation", "status", "transport"],
            registry=r,
        )
        self.duration = _Family(
            "histogram",
            "gateway_request_duration_seconds",
            "Time from request arrival to the last byte sent.",
            ["tenant", "model", "operation", "stream"],
            buckets=_LATENCY,
            registry=r,
        )
        self.upstream_duration = _Family(
            "histogram",
            "gateway_upstream_duration_seconds",
            "Time from sending upstream to the end of the upstream answer.",
            ["resource", "region", "operation"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttfb = _Family(
            "histogram",
            "gateway_time_to_first_byte_seconds",
            "Time from request arrival to the first body byte sent to the client.",
            ["tenant", "model", "stream"],
            buckets=_TTFB,
            registry=r,
        )
        self.tokens = _Family(
            "counter",
            "gateway_tokens_total",
            "Tokens reported by Azure usage, by kind (input, cached, output, reasoning).",
            ["tenant", "model", "kind"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Upstream answers >= 400 and transport failures (status 'connect').",
            ["resource", "region", "status"],
            registry=r,
        )
        self.stale_reads = Counter(
            "gateway_stale_read_retries_total",
            "Requests sent again to the same resource because Azure said an object the gateway "
            "knows it holds was not found (a stale read).",
            ["resource", "operation"],
            registry=r,
        )
        self.token_fetches = Counter(
            "gateway_entra_token_fetches_total",
            "Microsoft Entra token fetches, by result (success, failure).",
            ["result"],
            registry=r,
        )
        self.interrupted = _Family(
            "counter",
            "gateway_streams_interrupted_total",
            "Streams that ended early (client disconnect or upstream break).",
            ["tenant", "model"],
            registry=r,
        )
        self.gen_ai_tokens = _Family(
            "histogram",
            "gen_ai_client_token_usage",
            "OpenTelemetry GenAI: tokens per operation, by token type (input, output).",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=_TOKENS,
            registry=r,
        )
        self.gen_ai_duration = _Family(
            "histogram",
            "gen_ai_client_operation_duration_seconds",
            "OpenTelemetry GenAI: operation duration.",
            ["gen_ai_operation_name", "gen_ai_request_model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.quota_refusals = _Family(
            "counter",
            "gateway_quota_refusals_total",
            "Requests refused by a quota, by tenant and reason (requests_per_minute,"
            " tokens_per_minute, tokens_per_day, tokens_per_month, max_concurrent_requests,"
            " budget_per_day, budget_per_month).",
            ["tenant", "reason"],
            registry=r,
        )
        self.state_errors = Counter(
            "gateway_state_errors_total",
            "State backend (Redis) failures, by operation (admit, settle).",
            ["operation"],
            registry=r,
        )
        self.estimated_tokens = _Family(
            "counter",
            "gateway_estimated_tokens_total",
            "Tokens charged by estimate: streams cut before Azure reported usage.",
            ["tenant", "model"],
            registry=r,
        )
        self.mcp_tools = Counter(
            "gateway_mcp_tools_offered_total",
            "MCP tool definitions sent by clients, by tenant and server label.",
            ["tenant", "server_label"],
            registry=r,
        )
        self.mcp_calls = Counter(
            "gateway_mcp_calls_total",
            "MCP calls seen in responses, by tenant, server label and outcome.",
            ["tenant", "server_label", "outcome"],
            registry=r,
        )
        self.mcp_approvals = Counter(
            "gateway_mcp_approvals_total",
            "MCP approval requests (from Azure) and responses (from clients).",
            ["tenant", "server_label", "kind"],
            registry=r,
        )
        self.audit_records = Counter(
            "gateway_audit_records_total", "Audit records written, by event.", ["event"], registry=r
        )
        self.audit_failures = Counter(
            "gateway_audit_write_failures_total",
            "Audit batches a sink failed to write, by sink type.",
            ["sink"],
            registry=r,
        )
        self._labels: set[str] = set()
        self._children: dict[tuple[Any, ...], Any] = {}
        self.inflight = _Family(
            "gauge", "gateway_inflight_requests", "Requests being served right now.", registry=r
        )
        self.active_streams = _Family(
            "gauge", "gateway_active_streams", "SSE streams being relayed right now.", registry=r
        )
        self.loop_lag = Gauge(
            "gateway_event_loop_lag_seconds",
            "How late the event loop ran a timer at its last check (every 0.25 s): the time "
            "a ready request waits before the worker gets to it.",
            registry=r,
        )
        self.websocket_connections = Gauge(
            "gateway_websocket_connections",
            "Open client WebSockets per tenant and api (responses, realtime).",
            ["tenant", "api"],
            registry=r,
        )
        self.websocket_frames = Counter(
            "gateway_websocket_frames_total",
            "WebSocket frames relayed, by api and direction (in: from clients, out: to them).",
            ["api", "direction"],
            registry=r,
        )
        self.websocket_bytes = Counter(
            "gateway_websocket_bytes_total",
            "Bytes of the WebSocket frames relayed, by api and direction.",
            ["api", "direction"],
            registry=r,
        )
        self.state_events = Counter(
            "gateway_state_breaker_events_total",
            "State breaker events by kind (tripped, closed, skipped, queued, retried, dropped; "
            "late: a call whose answer the event loop read late, tried again, not tripped) "
            "and operation.",
            ["event", "operation"],
            registry=r,
        )
        self.state_open = Gauge(
            "gateway_state_breaker_open",
            "1 while the state store is being skipped after a failure.",
            registry=r,
        )
        self.state_queue = Gauge(
            "gateway_state_retry_queue",
            "State writes (settles, bindings) waiting to be retried.",
            registry=r,
        )
        self.target_state = Gauge(
            "gateway_target_state",
            "Circuit breaker of each upstream target: 0 closed, 1 half-open, 2 open.",
            ["resource", "deployment"],
            registry=r,
        )
        self.target_events = Counter(
            "gateway_target_breaker_events_total",
            "Breaker events per target: trip (seen here), trip_shared (from another replica), "
            "probe, closed.",
            ["resource", "deployment", "event"],
            registry=r,
        )
        self.spillover = _Family(
            "counter",
            "gateway_spillover_total",
            "Requests served by a target below the best priority of their model.",
            ["tenant", "model"],
            registry=r,
        )
        self.targets_unavailable = _Family(
            "counter",
            "gateway_targets_unavailable_total",
            "Requests refused because every target of the model was skipped by its breaker.",
            ["model", "reason"],
            registry=r,
        )
        self.cost = _Family(
            "counter",
            "gateway_cost_total",
            "Cost of the answered requests from the price table, in the price's currency "
            "(cut streams: from the estimate).",
            ["tenant", "model", "currency"],
            registry=r,
        )
        self.batch_lines = Counter(
            "gateway_batch_lines_total",
            "Lines of batch jobs: checked at upload (outcome uploaded), and in completed "
            "batches' output (charged, or failed: no usage).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.batch_charged_total = Counter(
            "gateway_batch_charged_total",
            "Completed batch jobs charged (once each, whichever replica saw them complete).",
            ["tenant", "model"],
            registry=r,
        )
        self.batch_tokens = Counter(
            "gateway_batch_tokens_total",
            "Tokens of charged batch jobs, by kind (input, cached, output, reasoning).",
            ["tenant", "model", "kind"],
            registry=r,
        )
        self.budget_warnings = Counter(
            "gateway_budget_warnings_total",
            "Charges that crossed a money budget's soft threshold (budgets.warn_at).",
            ["tenant", "model", "period"],
            registry=r,
        )
        r.register(_Budgets(config_source))
        self.guardrail_checks = Counter(
            "gateway_guardrail_checks_total",
            "Content Safety checks, by tenant, check (prompt_shield, documents,"
            " moderation_input, moderation_output) and verdict (pass, block, error, skipped).",
            ["tenant", "check", "verdict"],
            registry=r,
        )
        self.guardrail_seconds = Histogram(
            "gateway_guardrail_seconds",
            "Time of one Content Safety call, by check.",
            ["check"],
            buckets=_LATENCY,
            registry=r,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads, by result (applied, rejected).",
            ["result"],
            registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the label values are bounded by the config."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            if len(self._children) > 50_000:  # a safety net; configs never get near it
                self._children.clear()
            found = self._children[key] = metric.labels(*labels)
        return found

    def tenant_label(self, tenant: str | None) -> str:
        return tenant if tenant is not None and tenant in self._config().tenants else OTHER

    def model_label(self, model: str | None) -> str:
        return model if model is not None and model in self._config().models else OTHER

    def _target_labels(self, target: Target | None) -> tuple[str, str]:
        if target is None or target.resource not in self._config().resources:
            return OTHER, OTHER
        return target.resource, target.region

    def server_label(self, label: object) -> str:
        """Client-chosen MCP server labels, bounded: the first 100 sane ones, then ``other``."""
        if not isinstance(label, str) or not _LABEL.match(label):
            return OTHER
        if label not in self._labels:
            if len(self._labels) >= 100:
                return OTHER
            self._labels.add(label)
        return label

    def audit_record(self, ex: Exchange, rec: dict[str, Any]) -> None:
        event = rec.get("event", "")
        tenant = self.tenant_label(ex.tenant)
        self.audit_records.labels(event).inc()
        label = self.server_label(rec.get("server_label"))
        if event == "mcp.tool":
            self.mcp_tools.labels(tenant, label).inc()
        elif event == "mcp.call" and rec.get("source") == "response":
            self.mcp_calls.labels(tenant, label, "error" if rec.get("error") else "ok").inc()
        elif event == "mcp.approval_request" and rec.get("source") == "response":
            self.mcp_approvals.labels(tenant, label, "request").inc()
        elif event == "mcp.approval":
            self.mcp_approvals.labels(tenant, OTHER, "response").inc()

    def audit_failed(self, sink: str) -> None:
        self.audit_failures.labels(sink.split(":", 1)[0]).inc()

    def state_failed(self, operation: str) -> None:
        self.state_errors.labels(operation).inc()

    def batch_uploaded(self, tenant: str, lines: int) -> None:
        self.child(self.batch_lines, self.tenant_label(tenant), "uploaded").inc(lines)

    def batch_charged(
        self,
        tenant: str,
        model: str,
        kinds: dict[str, int],
        lines: int,
        failed: int,
        cost: Any,
    ) -> None:
        """A completed batch charged: its lines, tokens and cost."""
        t, m = self.tenant_label(tenant), self.model_label(model)
        self.child(self.batch_charged_total, t, m).inc()
        self.child(self.batch_lines, t, "charged").inc(lines - failed)
        if failed:
            self.child(self.batch_lines, t, "failed").inc(failed)
        for kind in ("input", "cached", "output", "reasoning"):
            if kinds.get(kind):
                self.child(self.batch_tokens, t, m, kind).inc(kinds[kind])
        if cost is not None and cost.amount:
            self.cost.labels(t, m, cost.currency).inc(cost.amount)

    def state_event(self, event: str, operation: str) -> None:
        self.state_events.labels(event, operation).inc()

    def budget_warning(self, tenant: str, model: str, period: str) -> None:
        m = self.model_label(model) if model else ""
        self.child(self.budget_warnings, self.tenant_label(tenant), m, period).inc()

    def breaker_event(self, event: str, target: str) -> None:
        resource, _, deployment = target.partition("/")
        self.child(self.target_events, resource, deployment, event).inc()

    def watch_targets(self, breakers: Any, targets: list[str]) -> None:
        """Each configured target's breaker state, read at scrape time."""

        def reader(key: str) -> Callable[[], float]:
            return lambda: float(breakers.state(key))

        for key in targets:
            resource, _, deployment = key.partition("/")
            self.target_state.labels(resource, deployment).set_function(reader(key))

    def socket_opened(self, ex: Exchange) -> None:
        self.websocket_connections.labels(self.tenant_label(ex.tenant), ex.api).inc()

    def socket_closed(self, ex: Exchange) -> None:
        self.websocket_connections.labels(self.tenant_label(ex.tenant), ex.api).dec()

    def socket_frame(self, ex: Exchange, direction: str, size: int) -> None:
        self.websocket_frames.labels(ex.api, direction).inc()
        self.websocket_bytes.labels(ex.api, direction).inc(size)

    def watch_keys(self, used: dict[str, tuple[str, float]]) -> None:
        """``gateway_key_last_used_timestamp_seconds{tenant,key_id}``: when this replica last
        saw each key (config and runtime), read at scrape time."""
        from prometheus_client.core import GaugeMetricFamily

        class _LastUsed:
            def collect(self) -> Any:
                family = GaugeMetricFamily(
                    "gateway_key_last_used_timestamp_seconds",
                    "When this replica last authenticated a request with the key (epoch s),"
                    " config and runtime keys.",
                    labels=["tenant", "key_id"],
                )
                for key_id, (tenant, at) in used.copy().items():
                    family.add_metric([tenant, key_id], at)
                yield family

        self.registry.register(_LastUsed())

    def watch_state(self, guard: Any) -> None:
        """Read the breaker's state and queue length at scrape time."""
        self.state_open.set_function(lambda: float(guard.is_open))
        self.state_queue.set_function(lambda: float(guard.queued))

    def guardrail(self, tenant: str, check: str, verdict: str, seconds: float) -> None:
        self.guardrail_checks.labels(self.tenant_label(tenant), check, verdict).inc()
        if seconds:
            self.guardrail_seconds.labels(check).observe(seconds)

    def token_fetched(self, ok: bool) -> None:
        self.token_fetches.labels("success" if ok else "failure").inc()

    def stale_read(self, ex: Exchange, target: Target) -> None:
        self.child(self.stale_reads, target.resource, ex.operation).inc()

    def upstream_failed(self, ex: Exchange, target: Target, status: int | None) -> None:
        resource, region = self._target_labels(target)
        self.upstream_errors.labels(resource, region, str(status) if status else "connect").inc()

    def started(self, ex: Exchange) -> None:
        self.inflight.inc()

    def stream_started(self, ex: Exchange) -> None:
        self.active_streams.inc()

    def finished(self, ex: Exchange) -> None:
        self.inflight.dec()
        if ex.stream_relayed:
            self.active_streams.dec()
        tenant = self.tenant_label(ex.tenant)
        model = self.model_label(ex.model)
        op = ex.operation
        stream = "true" if ex.stream else "false"
        self.requests.labels(tenant, model, op, str(ex.status), ex.transport).inc()
        if ex.quota_reason:
            self.quota_refusals.labels(tenant, ex.quota_reason).inc()
        if ex.duration_seconds is not None:
            self.duration.labels(tenant, model, op, stream).observe(ex.duration_seconds)
            if ex.status < 400:
                self.gen_ai_duration.labels(op, model).observe(ex.duration_seconds)
        if ex.ttfb_seconds is not None:
            self.ttfb.labels(tenant, model, stream).observe(ex.ttfb_seconds)
        if ex.upstream_seconds is not None:
            resource, region = self._target_labels(ex.target)
            self.upstream_duration.labels(resource, region, op).observe(ex.upstream_seconds)
        if ex.interrupted:
            self.interrupted.labels(tenant, model).inc()
        if ex.spillover:
            self.spillover.labels(tenant, model).inc()
        if ex.estimated_tokens:
            self.estimated_tokens.labels(tenant, model).inc(ex.estimated_tokens)
        if ex.cost:
            self.cost.labels(tenant, model, ex.currency or OTHER).inc(ex.cost)
        if ex.error_code in ("all_targets_throttled", "no_healthy_target"):
            self.targets_unavailable.labels(model, ex.error_code).inc()
        kinds = ex.usage_kinds()
        if kinds is not None:
            self._count_usage(tenant, model, op, kinds)

    def _count_usage(self, tenant: str, model: str, operation: str, kinds: dict[str, int]) -> None:
        for kind, n in kinds.items():
            if n:
                self.tokens.labels(tenant, model, kind).inc(n)
        tokens = self.gen_ai_tokens
        tokens.labels(operation, model, "input").observe(kinds["input"])
        tokens.labels(operation, model, "output").observe(kinds["output"])


if __name__ == "__main__":  # pragma: no cover
    print(markdown(), end="")
