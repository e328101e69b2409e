# ruff: noqa: E501, RUF001  (a table of meanings: one line per field reads best)
"""The configuration reference (docs/configuration.md), generated from the config models:
every field the models accept, with its default, and its meaning from ``MEANINGS``.

A test keeps the two equal: a field without a meaning, a meaning without a field, or a
stale page fails it (``python -m gateway.config.reference > docs/configuration.md``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .models import Config

# The name a mapping's key takes in a path, by the mapping's field name.
_KEY = {
    "resources": "NAME",
    "tenants": "NAME",
    "models": "MODEL",
    "prices": "MODEL",
    "model_quotas": "MODEL",
    "roles": "ROLE",
}
# Mappings of a model documented as one row ("the same fields as …"), not field by field.
_WHOLE = {
    "defaults.guardrails",
    "prices.MODEL.resources",
    "tenants.NAME.budgets.models",
    "tenants.NAME.model_quotas",
}

MEANINGS: dict[str, str] = {
    # credential
    "credential.type": "`default` (DefaultAzureCredential), `managed_identity`, `workload_identity`, `client_secret`, `azure_cli`",
    "credential.client_id": "user-assigned identity or app registration client id",
    "credential.tenant_id": "Entra directory (tenant) id of the app registration",
    "credential.client_secret_env": "env var holding the secret (`client_secret` only)",
    "credential.token_file_path": "federated token file (`workload_identity`; else `AZURE_FEDERATED_TOKEN_FILE`)",
    "credential.refresh_margin_seconds": "refresh a token this long before it expires",
    "credential.timeout_seconds": "a token fetch slower than this fails the request with 503",
    # resources
    "resources.NAME.endpoint": "`https://RESOURCE.openai.azure.com` (scheme and host only)",
    "resources.NAME.region": "Azure region (checked against Azure's region list), matched against tenant `regions`",
    "resources.NAME.auth": "`entra` or `api_key`",
    "resources.NAME.api_key_env": "env var holding the resource key (`auth: api_key`)",
    "resources.NAME.scope": "Entra scope of the tokens sent to this resource",
    # models
    "models.MODEL[].resource": "the resource (a key of `resources`) of this deployment",
    "models.MODEL[].deployment": "the Azure deployment name the logical model maps to there",
    "models.MODEL[].priority": "lower first; default: list order, so a plain list is an ordered fallback list (PTU first, then pay-as-you-go)",
    "models.MODEL[].weight": "share of traffic within its priority group",
    "models.MODEL[].batch": "a GlobalBatch/DataZoneBatch deployment: only batch lines go to it, interactive traffic never does",
    # content safety
    "content_safety.NAME.endpoint": "an Azure AI Content Safety resource, `https://NAME.cognitiveservices.azure.com` (guardrails)",
    "content_safety.NAME.region": "its Azure region: a tenant's text is checked only on resources in the tenant's regions",
    "content_safety.NAME.auth": "`entra` (the gateway's credential) or `api_key`",
    "content_safety.NAME.api_key_env": "env var holding the resource key (`auth: api_key`)",
    "content_safety.NAME.scope": "Entra scope of the tokens sent to it",
    "defaults.guardrails": "guardrails for tenants without their own block (the same fields as `tenants.NAME.guardrails`)",
    # prices
    "prices.MODEL.currency": "ISO 4217 code (`EUR`); budgets use the same",
    "prices.MODEL.input": "per 1M input tokens",
    "prices.MODEL.cached_input": "per 1M cached input tokens (default: `input`)",
    "prices.MODEL.output": "per 1M output tokens",
    "prices.MODEL.reasoning": "per 1M reasoning tokens (default: `output`)",
    "prices.MODEL.audio_input": "per 1M Realtime audio input tokens (default: `input`)",
    "prices.MODEL.audio_output": "per 1M Realtime audio output tokens (default: `output`)",
    "prices.MODEL.hourly": "a fixed cost per hour (a PTU), which usage reports spread by token share",
    "prices.MODEL.batch_input": "batch jobs, per 1M input tokens (default: `input` × `batch_discount`)",
    "prices.MODEL.batch_cached_input": "batch jobs, per 1M cached input tokens (default: `cached_input` × `batch_discount`)",
    "prices.MODEL.batch_output": "batch jobs, per 1M output tokens (default: `output` × `batch_discount`)",
    "prices.MODEL.batch_discount": "batch prices as a share of the interactive ones",
    "prices.MODEL.resources": "per resource `{RESOURCE: {input, output, …}}`: the same fields, e.g. a PTU deployment at 0 per token",
    # tenants
    "tenants.NAME.files.resource": "where the tenant's uploads, vector stores, containers and conversations are created (must be in its regions)",
    "tenants.NAME.keys[].id": "the key's id (logs, metrics, audit; never the key)",
    "tenants.NAME.keys[].sha256": "SHA-256 of the key (`gateway keys new`); the key itself is never stored",
    "tenants.NAME.keys[].expires_at": "ISO time with zone; afterwards the key gets 401 `expired_api_key`",
    "tenants.NAME.models": "allowed logical models: exact names and `*` globs; an entry that matches no model is a config error",
    "tenants.NAME.regions": "residency pin: only resources in these regions serve the tenant",
    "tenants.NAME.quotas.requests_per_minute": "token bucket, across replicas with Redis",
    "tenants.NAME.quotas.tokens_per_minute": "token bucket of input + output tokens, charged when the answer's usage is known",
    "tenants.NAME.quotas.tokens_per_day": "per UTC day",
    "tenants.NAME.quotas.tokens_per_month": "per UTC calendar month",
    "tenants.NAME.quotas.max_concurrent_requests": "requests and streams in flight at once",
    "tenants.NAME.model_quotas": "per logical model `{MODEL: {requests_per_minute, …}}`: the same kinds as `quotas`, on top of them",
    "tenants.NAME.mcp.allowed_servers": "what MCP tools may call: `server_url` globs, and `connector_id` / `tunnel_id` names or globs (entries starting `connector_` / `tunnel_`), each matched against entries of its own kind; others → 403 `mcp_server_not_allowed`",
    "tenants.NAME.mcp.require_approval": "`always`: every MCP tool's `require_approval` is rewritten to `always` (audited as `mcp.policy`)",
    "tenants.NAME.tools.allowed": "tool types the tenant may send (`function`, `mcp`, `file_search`, …); others → 403 `tool_not_allowed`",
    "tenants.NAME.budgets.currency": "the currency of `prices` (checked at start)",
    "tenants.NAME.budgets.per_day": "money per UTC day; reached → 429 `budget_exceeded`",
    "tenants.NAME.budgets.per_month": "money per UTC calendar month",
    "tenants.NAME.budgets.warn_at": "share of a budget at which `budget.warning` is logged and counted (no refusal)",
    "tenants.NAME.budgets.models": "per logical model `{MODEL: {per_day, per_month}}`, on top of the tenant's",
    "tenants.NAME.guardrails.prompt_shield": "user prompts go to Prompt Shields (`userPrompt`); an attack → 400 `content_filter` (`jailbreak`)",
    "tenants.NAME.guardrails.documents": "tool, function and MCP outputs a request carries go to Prompt Shields (`documents`); an attack → 400 `content_filter` (`indirect_attack`)",
    "tenants.NAME.guardrails.moderation.input": "prompts go to `text:analyze`; a category at this severity (0-7) or above → 400 `content_filter`",
    "tenants.NAME.guardrails.moderation.output": "answers checked at this severity: not applied yet by this version (refused at start rather than ignored)",
    "tenants.NAME.guardrails.stream_window_chars": "streamed output is released in checked windows of this many characters (with `moderation.output`)",
    "tenants.NAME.guardrails.mode": "`before`: nothing goes upstream until the verdict (`parallel`: not applied yet by this version, refused at start)",
    "tenants.NAME.guardrails.on_error": "Content Safety slow, failing or its breaker open: `closed` → 503 `guardrail_unavailable` with `retry-after`; `open` → forwarded, audited `guardrail.skipped`",
    "tenants.NAME.guardrails.timeout_seconds": "one Content Safety call; past it the call counts as failed",
    # state
    "state.backend": "`sqlite` (one replica, durable: the state file), `redis` (several replicas share quotas, bindings and keys) or `memory` (one replica, forgets everything on restart: warned at start and in `/readyz`)",
    "state.path": '`sqlite`: the state file (WAL; a memory-mapped log `PATH-log` and a `.lock` beside it). A binding is stored into the log before the client sees its id; spend, ledger and markers within 0.1 s; the log is folded into the file every 10 s on one thread, so the event loop never waits on the disk; rate buckets and concurrency slots start afresh after a restart. One process per file (a second is refused at start); see docs/operations.md "State"',
    "state.mode": "`single` (one Redis server, or a proxy endpoint such as Azure's Enterprise cluster policy) or `cluster` (a Redis Cluster)",
    "state.url_env": "env var holding the Redis URL (`redis://`, `rediss://` for TLS; password in the URL)",
    "state.response_retention_days": "how long an id stays bound to its tenant (Azure keeps responses 30 days)",
    "state.on_state_error": "when Redis fails: `allow` (serve without quotas, counted and logged) or `deny` (503 `state_unavailable`)",
    "state.timeout_seconds": "Redis connect/read timeout: a dead or black-holed Redis never holds a request longer",
    "state.lease_seconds": "a concurrency slot held by a replica that died is freed after this",
    "state.breaker_seconds": "after a Redis timeout or connection error, Redis is skipped this long; then one call probes it",
    "state.retry_queue_size": "settles and bindings that failed during a Redis outage, kept and retried; beyond this the oldest is dropped (counted)",
    "state.memory_max_objects": "`memory`/`sqlite`: bindings and charge markers held in memory (oldest evicted; `sqlite` reads evicted ones from the file)",
    # upstream
    "upstream.connect_timeout": "seconds",
    "upstream.read_timeout": "seconds between bytes (long: reasoning models, streams)",
    "upstream.write_timeout": "accepted for compatibility, not applied (the aiohttp client has no write timeout)",
    "upstream.pool_timeout": "seconds to wait for a free pooled connection (then 503 `upstream_pool_exhausted`)",
    "upstream.stale_read_retries": 'how often a "not found" for an object the gateway knows is on that resource is asked again',
    "upstream.stale_read_backoff_seconds": "the pause between those tries (× try number)",
    "upstream.max_connections": "pooled upstream connections = open streams per replica",
    "upstream.preconnect": "connections opened ahead when traffic to an upstream grows (`0`: off)",
    "upstream.trust_env": "honour `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` for upstream calls",
    "upstream.ca_file": "PEM file of the CA(s) to trust for upstream TLS (default: the system store)",
    "upstream.forward_headers": "request headers forwarded besides the built-in allowlist: lower-case names or globs; credentials, `host`, `cookie` and `content-length` are refused",
    # breaker
    "breaker.failures": "a target that fails this often within `window_seconds` (connect error, timeout, 5xx, 429 without Retry-After) is skipped",
    "breaker.window_seconds": "the window of `failures`",
    "breaker.open_seconds": "how long a failing target is skipped before one request probes it",
    "breaker.max_retry_after_seconds": "a 429's `retry-after-ms`/`retry-after` skips the target that long, capped here",
    # usage, batches, tracing
    "usage.ledger": "keep the usage ledger (tenant × model × UTC day) in the state backend",
    "usage.retention_days": "how long ledger days are kept",
    "batches.poll_seconds": "the batch watcher's interval (each open batch backs off to 60 s)",
    "batches.lease_seconds": "the watcher's lease in the state backend: another replica takes over this long after the holder dies",
    "tracing.otlp_endpoint": "OTLP/HTTP collector base URL (e.g. `http://otel-collector:4318`): one span per request; needs the `tracing` extra",
    "tracing.service_name": "span resource name",
    "tracing.sample_ratio": "share of new traces sampled (a client's sampled `traceparent` is honoured)",
    # admin
    "admin.key_sha256": "SHA-256 of a gateway-wide admin key (id `admin`): the admin API; refused if it is a tenant key's",
    "admin.keys[].id": "the admin key's id (the `actor` of its audit records)",
    "admin.keys[].sha256": "SHA-256 of the admin key",
    "admin.keys[].tenants": '`["*"]`: a gateway admin; a list of tenants: a tenant admin who manages only those (403 elsewhere)',
    "admin.entra.tenant_id": "Entra directory whose access tokens are admin credentials",
    "admin.entra.audience": "the tokens' `aud` (the gateway's app registration)",
    "admin.entra.roles": 'app role → `["*"]` or the tenants it manages',
    "admin.entra.authority": "the Entra authority (its keys are fetched from there)",
    # server
    "server.max_body_bytes": "larger request bodies get 413, on every route",
    "server.max_upload_bytes": "streamed uploads (`POST /files`, container files) larger than this get 413",
    "server.max_json_depth": "request JSON nested deeper is refused (400 `invalid_json`)",
    "server.body_timeout_seconds": "a request body that stops arriving this long is cut with 408 `request_timeout`",
    "server.websocket_idle_seconds": "a WebSocket with no frame either way this long is closed (1000, with a reason)",
    "server.websocket_max_seconds": "a WebSocket open this long is closed (Azure's own cap)",
    "server.header_timeout_seconds": "a connection whose request head is not complete this long is closed",
    "server.keepalive_timeout_seconds": "idle client keep-alive connections are closed after this (longer than the ingress's)",
    "server.trusted_proxies": "CIDRs of proxies (the ingress) whose `X-Forwarded-For` is believed for the client address",
    "server.shutdown_grace_seconds": "after SIGTERM, in-flight requests and streams get this long to finish",
    "server.drain_delay_seconds": "after SIGTERM, `/readyz` answers 503 this long before the listener closes",
    "server.reload_interval_seconds": "how often the config file is checked for changes (`0`: only on SIGHUP)",
    "server.gc_freeze": "`gateway serve` moves what exists at start out of reach of Python's cyclic collector",
    "server.gc_thresholds": "Python's collector thresholds for `gateway serve` (Python's own: 700, 10, 10)",
    # audit
    "audit.path": "shorthand for one `file` sink at this path",
    "audit.sinks[].type": "`file`, `stdout` or `redis`",
    "audit.sinks[].path": "`file`: the JSON-lines file (hash-chained; `gateway audit verify`)",
    "audit.sinks[].max_bytes": "`file`: rotate past this size (`0`: never)",
    "audit.sinks[].backups": "`file`: rotated files kept",
    "audit.sinks[].fsync": "`file`: each record is on disk before the request goes on",
    "audit.sinks[].url_env": "`redis`: env var holding the Redis URL",
    "audit.sinks[].mode": "`redis`: `single` or `cluster`",
    "audit.sinks[].stream": "`redis`: the stream records are added to",
    "audit.sinks[].maxlen": "`redis`: the stream is trimmed to about this many records",
    "audit.on_failure": "a request-side record that cannot be written: `reject` (503 `audit_unavailable`, nothing forwarded) or `allow` (forward; counted and logged)",
    "audit.secret_keys": "argument/output keys whose values are written as `[REDACTED]` (substring, case-insensitive)",
    "audit.extra_secret_keys": "more such keys, added to `secret_keys`",
    "audit.max_output_chars": "longer arguments/outputs are cut; `*_length` and `*_sha256` of the original are recorded",
    # metrics
    "metrics.port": "serve `/metrics` on its own port (then not on the API port, so the ingress never exposes it)",
    "metrics.host": "the address of that port",
}


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → X; ``Annotated[X, …]`` → X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def fields(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, default) of every field the config accepts, in the models' order."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = _unwrap(info.annotation)
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        default = info.default
        if path in _WHOLE:
            yield path, default
        elif (inner := _model(annotation)) is not None:
            yield from fields(inner, path + ".")
        elif origin is dict and (inner := _model(args[1])) is not None:
            yield from fields(inner, f"{path}.{_KEY.get(name, 'NAME')}.")
        elif origin is dict and typing.get_origin(_unwrap(args[1])) is tuple:
            items = _model(typing.get_args(_unwrap(args[1]))[0])
            if items is None:
                yield path, default
            else:
                yield from fields(items, f"{path}.{_KEY.get(name, 'NAME')}[].")
        elif origin is tuple and args and (inner := _model(args[0])) is not None:
            yield from fields(inner, path + "[].")
        else:
            yield path, default


def _shown(default: Any) -> str:
    if default is PydanticUndefined:
        return "required"
    if default is None:
        return "—"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, tuple | list):
        return "`[" + ", ".join(str(d) for d in default) + "]`"
    if isinstance(default, dict):
        return "`{}`"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


HEADER = """# Configuration reference

One YAML file (a ConfigMap in Kubernetes), validated at start, by `gateway check` and on
every reload (a refused reload keeps the old config serving): unknown keys, a key twice in
one mapping, a model naming an unknown resource, an allowlist entry that matches no model,
a region that is not Azure's, missing environment variables are refused with the field
path and YAML line. [`config/example.yaml`](../config/example.yaml) is a commented example.
`NAME`, `MODEL` and `ROLE` stand for keys you choose; `[]` for the items of a list.

This page is generated from the config models (`gateway/config/reference.py`; a test keeps
it equal): every field the gateway accepts is here.

| field | default | meaning |
|---|---|---|
"""


def markdown() -> str:
    rows = [f"| `{path}` | {_shown(default)} | {MEANINGS[path]} |" for path, default in fields()]
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(markdown(), end="")
