"""The config's shape: every section as a frozen pydantic model, with its defaults.

Validation of single fields lives here; what spans fields (unknown resources, duplicate
keys, currencies) is checked by ``load.py``, which also reads the environment.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_SCOPE = "https://cognitiveservices.azure.com/.default"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")

Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _env_name(value: str | None) -> str | None:
    if value is not None and not _ENV_NAME.match(value):
        raise ValueError(f"{value!r} is not an environment variable name")
    return value


class CredentialConfig(_Frozen):
    type: Literal[
        "default", "managed_identity", "workload_identity", "client_secret", "azure_cli"
    ] = "default"
    client_id: str | None = None
    tenant_id: str | None = None
    client_secret_env: str | None = None
    token_file_path: str | None = None
    refresh_margin_seconds: PositiveFloat = 300.0
    timeout_seconds: PositiveFloat = 10.0

    _check_env = field_validator("client_secret_env")(_env_name)

    @model_validator(mode="after")
    def _client_secret_fields(self) -> CredentialConfig:
        if self.type == "client_secret":
            missing = [
                f for f in ("tenant_id", "client_id", "client_secret_env") if not getattr(self, f)
            ]
            if missing:
                raise ValueError(f"type client_secret needs {', '.join(missing)}")
        return self


class ResourceConfig(_Frozen):
    endpoint: str
    region: str
    auth: Literal["entra", "api_key"] = "entra"
    api_key_env: str | None = None
    scope: str = DEFAULT_SCOPE

    _check_env = field_validator("api_key_env")(_env_name)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL with a host")
        if parts.query or parts.fragment or parts.path not in ("", "/"):
            raise ValueError(f"{value!r} must be scheme://host[:port] with no path or query")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _auth_fields(self) -> ResourceConfig:
        if self.auth == "api_key" and not self.api_key_env:
            raise ValueError("auth: api_key needs api_key_env")
        if self.auth == "entra" and self.api_key_env:
            raise ValueError("api_key_env is only used with auth: api_key")
        return self


class TargetConfig(_Frozen):
    resource: str
    deployment: str
    priority: Annotated[int, Field(ge=0)] | None = None  # lower first; default: list order
    weight: PositiveFloat = 1.0  # share of traffic within its priority group
    # A GlobalBatch/DataZoneBatch deployment: only batch lines go to it, never interactive
    # traffic (not even when every interactive target is down).
    batch: bool = False


NonNegativeFloat = Annotated[float, Field(ge=0)]


class TokenPrices(_Frozen):
    """Prices per 1M tokens; ``reasoning`` when reasoning tokens are priced apart from output."""

    input: NonNegativeFloat
    cached_input: NonNegativeFloat | None = None  # default: the input price
    output: NonNegativeFloat
    reasoning: NonNegativeFloat | None = None  # default: the output price
    audio_input: NonNegativeFloat | None = None  # Realtime audio tokens; default: input
    audio_output: NonNegativeFloat | None = None  # default: the output price
    hourly: NonNegativeFloat = 0.0  # a fixed cost per hour (PTU), for reports to spread
    # Batch jobs: their own prices, or the token prices times ``batch_discount``.
    batch_input: NonNegativeFloat | None = None
    batch_cached_input: NonNegativeFloat | None = None
    batch_output: NonNegativeFloat | None = None
    batch_discount: Annotated[float, Field(ge=0, le=1)] = 0.5


class PriceConfig(TokenPrices):
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    resources: dict[str, TokenPrices] = {}  # per-resource override (e.g. PTU: 0 per token)


class BreakerConfig(_Frozen):
    failures: Positive = 5
    window_seconds: PositiveFloat = 10.0
    open_seconds: PositiveFloat = 30.0
    max_retry_after_seconds: PositiveFloat = 60.0


class KeyConfig(_Frozen):
    id: str
    sha256: str
    expires_at: datetime | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.lower()
        if not _HEX64.match(value):
            raise ValueError("must be 64 hex characters (the SHA-256 of the key)")
        return value

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone, e.g. 2027-01-31T00:00:00Z")
        return value


class QuotaConfig(_Frozen):
    requests_per_minute: Positive | None = None
    tokens_per_minute: Positive | None = None
    tokens_per_day: Positive | None = None
    tokens_per_month: Positive | None = None
    max_concurrent_requests: Positive | None = None


class McpPolicyConfig(_Frozen):
    allowed_servers: tuple[str, ...] | None = None
    require_approval: Literal["always"] | None = None


class ToolPolicyConfig(_Frozen):
    allowed: tuple[str, ...] | None = None


class BudgetLimits(_Frozen):
    per_day: PositiveFloat | None = None  # in the budget's currency
    per_month: PositiveFloat | None = None


class BudgetConfig(BudgetLimits):
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    warn_at: Annotated[float, Field(gt=0, le=1)] = 0.8  # soft threshold: warn, don't refuse
    models: dict[str, BudgetLimits] = {}


class TenantFilesConfig(_Frozen):
    resource: str | None = None  # where uploads (and other home-routed objects) land


class ModerationConfig(_Frozen):
    """text:analyze thresholds: refuse at severity >= N (0-7); a side omitted is off."""

    input: Annotated[int, Field(ge=0, le=7)] | None = None
    output: Annotated[int, Field(ge=0, le=7)] | None = None


class GuardrailsConfig(_Frozen):
    """Azure AI Content Safety checks on a tenant's traffic (all off by default)."""

    prompt_shield: bool = False  # user prompts -> Prompt Shields userPrompt
    documents: bool = False  # tool / MCP / function outputs -> Prompt Shields documents
    moderation: ModerationConfig = ModerationConfig()
    stream_window_chars: Annotated[int, Field(ge=64, le=10_000)] = 600
    mode: Literal["before", "parallel"] = "before"
    on_error: Literal["closed", "open"] = "closed"
    timeout_seconds: PositiveFloat = 2.0

    @property
    def inputs(self) -> bool:
        """Whether anything a request carries is checked."""
        return self.prompt_shield or self.documents or self.moderation.input is not None

    @property
    def any(self) -> bool:
        return self.inputs or self.moderation.output is not None


class DefaultsConfig(_Frozen):
    guardrails: GuardrailsConfig | None = None  # for tenants without their own block


class TenantConfig(_Frozen):
    files: TenantFilesConfig = TenantFilesConfig()
    keys: tuple[KeyConfig, ...] = ()
    models: tuple[str, ...] = ()
    regions: tuple[str, ...] | None = None
    quotas: QuotaConfig = QuotaConfig()
    model_quotas: dict[str, QuotaConfig] = {}
    mcp: McpPolicyConfig = McpPolicyConfig()
    tools: ToolPolicyConfig = ToolPolicyConfig()
    budgets: BudgetConfig | None = None
    guardrails: GuardrailsConfig | None = None  # replaces defaults.guardrails whole


class StateConfig(_Frozen):
    # sqlite: durable, one replica; redis: several replicas; memory: forgets on restart.
    backend: Literal["memory", "redis", "sqlite"] = "sqlite"
    path: str = "gateway-state.db"  # backend sqlite: the state file (WAL beside it)
    mode: Literal["single", "cluster"] = "single"
    url_env: str | None = None
    response_retention_days: PositiveFloat = 30.0
    on_state_error: Literal["allow", "deny"] = "allow"
    timeout_seconds: PositiveFloat = 0.2
    lease_seconds: PositiveFloat = 300.0
    breaker_seconds: PositiveFloat = 5.0
    retry_queue_size: Positive = 10_000
    memory_max_objects: Positive = 250_000

    _check_env = field_validator("url_env")(_env_name)

    @model_validator(mode="after")
    def _redis_url(self) -> StateConfig:
        if self.backend == "redis" and not self.url_env:
            raise ValueError("backend: redis needs url_env (the variable holding the Redis URL)")
        return self


class UpstreamConfig(_Frozen):
    connect_timeout: PositiveFloat = 5.0
    read_timeout: PositiveFloat = 600.0
    write_timeout: PositiveFloat = 60.0
    pool_timeout: PositiveFloat = 10.0
    stale_read_retries: Annotated[int, Field(ge=0, le=10)] = 3
    stale_read_backoff_seconds: Annotated[float, Field(ge=0, le=5)] = 0.2
    max_connections: Positive = 10_000
    preconnect: Annotated[int, Field(ge=0, le=256)] = 8
    trust_env: bool = False
    ca_file: str | None = None
    # Request headers forwarded besides the built-in allowlist (lower-case globs).
    forward_headers: tuple[str, ...] = ()

    @field_validator("forward_headers")
    @classmethod
    def _header_globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not re.fullmatch(r"[a-z0-9*?_-]+", pattern) or pattern.lstrip("*?") == "":
                raise ValueError(
                    f"{pattern!r} is not a lower-case header name or glob (like 'x-team-*')"
                )
            if pattern in ("api-key", "authorization", "host", "content-length", "cookie"):
                raise ValueError(f"{pattern!r} is set by the gateway and cannot be forwarded")
        return value


class ServerConfig(_Frozen):
    max_body_bytes: Positive = 50 * 1024 * 1024
    max_upload_bytes: Positive = 512 * 1024 * 1024  # streamed uploads (Files, container files)
    max_json_depth: Annotated[int, Field(gt=0, le=512)] = 128
    body_timeout_seconds: PositiveFloat = 30.0
    websocket_idle_seconds: PositiveFloat = 600.0  # no frame either way: closed (1000)
    websocket_max_seconds: PositiveFloat = 3600.0  # Azure's own cap on a connection
    header_timeout_seconds: PositiveFloat = 10.0
    keepalive_timeout_seconds: PositiveFloat = 75.0
    trusted_proxies: tuple[str, ...] = ()
    shutdown_grace_seconds: PositiveFloat = 30.0
    drain_delay_seconds: Annotated[float, Field(ge=0)] = 0.0
    reload_interval_seconds: Annotated[float, Field(ge=0)] = 5.0
    # Python's collector: see server.tune_gc.
    gc_freeze: bool = True
    gc_thresholds: tuple[Positive, Positive, Positive] = (5000, 1, 1000)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR") from None
        return value


DEFAULT_SECRET_KEYS = (
    "password",
    "passwd",
    "token",
    "secret",
    "api_key",
    "apikey",
    "api-key",
    "authorization",
    "credential",
    "private_key",
    "cookie",
)


class AuditSinkConfig(_Frozen):
    type: Literal["file", "stdout", "redis"]
    path: str | None = None
    max_bytes: Annotated[int, Field(ge=0)] = 100 * 1024 * 1024
    backups: Annotated[int, Field(ge=0)] = 10
    fsync: bool = True
    url_env: str | None = None
    mode: Literal["single", "cluster"] = "single"
    stream: str = "gateway:audit"
    maxlen: Positive = 1_000_000

    _check_env = field_validator("url_env")(_env_name)

    @model_validator(mode="after")
    def _fields(self) -> AuditSinkConfig:
        if self.type == "file" and not self.path:
            raise ValueError("type: file needs path")
        if self.type == "redis" and not self.url_env:
            raise ValueError("type: redis needs url_env")
        return self


class AuditConfig(_Frozen):
    path: str | None = None
    sinks: tuple[AuditSinkConfig, ...] = ()
    on_failure: Literal["reject", "allow"] = "reject"
    secret_keys: tuple[str, ...] = DEFAULT_SECRET_KEYS
    extra_secret_keys: tuple[str, ...] = ()
    max_output_chars: Positive = 4096

    def all_sinks(self) -> tuple[AuditSinkConfig, ...]:
        """``sinks``, plus a file sink for the ``path`` shorthand."""
        if self.path:
            return (AuditSinkConfig(type="file", path=self.path), *self.sinks)
        return self.sinks


class BatchesConfig(_Frozen):
    poll_seconds: PositiveFloat = 15.0  # the watcher's interval (backoff to 60 s per batch)
    lease_seconds: PositiveFloat = 45.0  # the watcher's lease: another replica takes over after


class UsageConfig(_Frozen):
    ledger: bool = True  # per tenant x model x UTC day, in the state backend
    retention_days: Positive = 400


class AdminKeyConfig(_Frozen):
    id: str
    sha256: str
    tenants: tuple[str, ...] = ("*",)  # ["*"]: a gateway admin; else the tenants it manages

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.lower()
        if not _HEX64.match(value):
            raise ValueError("must be 64 hex characters (the SHA-256 of the admin key)")
        return value


class EntraAdminConfig(_Frozen):
    """Microsoft Entra access tokens as admin credentials: app roles map to tenants."""

    tenant_id: str
    audience: str
    roles: dict[str, tuple[str, ...]]  # app role -> ["*"] or the tenants it manages
    authority: str = "https://login.microsoftonline.com"

    @field_validator("authority")
    @classmethod
    def _url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("tenant_id")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,128}", value):
            raise ValueError("must be a directory (tenant) id or domain")
        return value


class AdminConfig(_Frozen):
    key_sha256: str | None = None  # one gateway-wide admin key (id "admin"); never a tenant key
    keys: tuple[AdminKeyConfig, ...] = ()
    entra: EntraAdminConfig | None = None

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.match(value.lower()):
            raise ValueError("must be 64 hex characters (the SHA-256 of the admin key)")
        return value.lower() if value else value


class TracingConfig(_Frozen):
    otlp_endpoint: str | None = None  # e.g. http://otel-collector:4318; off when unset
    service_name: str = "azure-responses-gateway"
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0

    @field_validator("otlp_endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class MetricsConfig(_Frozen):
    port: Annotated[int, Field(gt=0, lt=65536)] | None = None
    host: str = "0.0.0.0"


class Config(_Frozen):
    credential: CredentialConfig = CredentialConfig()
    resources: dict[str, ResourceConfig]
    # Azure AI Content Safety resources (same fields as ``resources``), for guardrails.
    content_safety: dict[str, ResourceConfig] = {}
    defaults: DefaultsConfig = DefaultsConfig()
    models: dict[str, tuple[TargetConfig, ...]]
    tenants: dict[str, TenantConfig]
    state: StateConfig = StateConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    breaker: BreakerConfig = BreakerConfig()
    prices: dict[str, PriceConfig] = {}
    usage: UsageConfig = UsageConfig()
    batches: BatchesConfig = BatchesConfig()
    tracing: TracingConfig = TracingConfig()
    admin: AdminConfig = AdminConfig()
    server: ServerConfig = ServerConfig()
    audit: AuditConfig = AuditConfig()
    metrics: MetricsConfig = MetricsConfig()


def guardrails_of(cfg: Config, tenant: TenantConfig) -> GuardrailsConfig | None:
    """A tenant's guardrails: its own block, else ``defaults.guardrails`` (no merge)."""
    return tenant.guardrails if tenant.guardrails is not None else cfg.defaults.guardrails


def region_ok(tenant: TenantConfig, region: str) -> bool:
    """Whether the tenant's residency pin (if any) admits ``region``."""
    return tenant.regions is None or region in tenant.regions
