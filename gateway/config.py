"""YAML config → validated, immutable config objects.

The environment is read here and nowhere else: secrets named by ``*_env`` fields
are resolved into ``LoadedConfig.secrets`` at load time, so a missing variable
fails at start with the field that named it.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_SCOPE = "https://cognitiveservices.azure.com/.default"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """The config file is unusable; the message names each bad field path."""


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


class StateConfig(_Frozen):
    backend: Literal["memory", "redis"] = "memory"
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


@dataclass(frozen=True)
class Secret:
    """A secret value whose repr never shows it."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(****)"


@dataclass(frozen=True)
class LoadedConfig:
    """The validated config plus the secrets its ``*_env`` fields named."""

    config: Config
    resource_keys: Mapping[str, Secret]
    client_secret: Secret | None = None
    redis_url: Secret | None = None
    source: str = "<memory>"
    audit_urls: tuple[Secret | None, ...] = ()


def region_ok(tenant: TenantConfig, region: str) -> bool:
    """Whether the tenant's residency pin (if any) admits ``region``."""
    return tenant.regions is None or region in tenant.regions


def _cross_check(cfg: Config) -> list[str]:
    errors: list[str] = []
    regions = {r.region for r in cfg.resources.values()}
    for name in cfg.resources:
        if not _NAME.match(name):
            errors.append(f"resources.{name}: names use letters, digits, '.', '_' and '-'")
    for model, targets in cfg.models.items():
        if not targets:
            errors.append(f"models.{model}: needs at least one {{resource, deployment}}")
        for i, t in enumerate(targets):
            if t.resource not in cfg.resources:
                errors.append(f"models.{model}[{i}].resource: unknown resource {t.resource!r}")
    ids: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for tname, tenant in cfg.tenants.items():
        if not _NAME.match(tname):
            errors.append(f"tenants.{tname}: names use letters, digits, '.', '_' and '-'")
        for i, key in enumerate(tenant.keys):
            where = f"tenants.{tname}.keys[{i}]"
            if key.id in ids:
                errors.append(f"{where}.id: duplicate key id {key.id!r} (also {ids[key.id]})")
            ids.setdefault(key.id, where)
            if key.sha256 in hashes:
                errors.append(f"{where}.sha256: duplicate key hash (also {hashes[key.sha256]})")
            hashes.setdefault(key.sha256, where)
        for i, region in enumerate(tenant.regions or ()):
            if region not in regions:
                errors.append(f"tenants.{tname}.regions[{i}]: no resource is in region {region!r}")
        home = tenant.files.resource
        if home is not None and home not in cfg.resources:
            errors.append(f"tenants.{tname}.files.resource: unknown resource {home!r}")
        elif home is not None and not region_ok(tenant, cfg.resources[home].region):
            errors.append(
                f"tenants.{tname}.files.resource: {home!r} is in "
                f"{cfg.resources[home].region}, outside the tenant's regions"
            )
        for model in tenant.model_quotas:
            if model not in cfg.models:
                errors.append(f"tenants.{tname}.model_quotas.{model}: unknown model")
        if tenant.budgets is not None:
            for model in tenant.budgets.models:
                if model not in cfg.models:
                    errors.append(f"tenants.{tname}.budgets.models.{model}: unknown model")
            for model, price in cfg.prices.items():
                usable = any(fnmatchcase(model, p) for p in tenant.models)
                if usable and price.currency != tenant.budgets.currency:
                    errors.append(
                        f"tenants.{tname}.budgets.currency: {tenant.budgets.currency} differs "
                        f"from prices.{model}.currency {price.currency}"
                    )
    if cfg.admin.key_sha256 is not None and cfg.admin.key_sha256 in hashes:
        errors.append(
            f"admin.key_sha256: the admin key is a tenant key ({hashes[cfg.admin.key_sha256]})"
        )
    admin_ids: set[str] = {"admin"} if cfg.admin.key_sha256 else set()
    for i, akey in enumerate(cfg.admin.keys):
        where = f"admin.keys[{i}]"
        if akey.sha256 in hashes or akey.sha256 == cfg.admin.key_sha256:
            errors.append(f"{where}.sha256: the admin key is also another key")
        if akey.id in admin_ids:
            errors.append(f"{where}.id: duplicate admin key id {akey.id!r}")
        admin_ids.add(akey.id)
        for name in akey.tenants:
            if name != "*" and name not in cfg.tenants:
                errors.append(f"{where}.tenants: unknown tenant {name!r}")
    if cfg.admin.entra is not None:
        for role, names in cfg.admin.entra.roles.items():
            for name in names:
                if name != "*" and name not in cfg.tenants:
                    errors.append(f"admin.entra.roles.{role}: unknown tenant {name!r}")
    for model, price in cfg.prices.items():
        if model not in cfg.models:
            errors.append(f"prices.{model}: unknown model")
        for resource in price.resources:
            if resource not in cfg.resources:
                errors.append(f"prices.{model}.resources.{resource}: unknown resource")
    return errors


def _format_validation(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(
            f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"] if p != "__root__"
        ).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _fields_at(err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), sorted(known), n=1)
            msg = f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}"
        lines.append(f"{path or '(top level)'}: {msg}")
    return "\n".join(lines)


def _fields_at(loc: tuple[Any, ...]) -> set[str]:
    """The field names of the config model at ``loc`` (for "did you mean")."""
    node: Any = Config
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return set()
            node = field.annotation
            continue
        origin, args = get_origin(node), get_args(node)
        if origin is dict and len(args) == 2:
            node = args[1]  # ``part`` is a name of the mapping
        elif origin is tuple and args:
            node = args[0]  # ``part`` is an index
        else:
            return set()
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return set(node.model_fields)
    return set()


def _unwrap(node: Any) -> Any:
    """``X`` out of ``X | None`` and ``Annotated[X, ...]``."""
    while True:
        args = [a for a in get_args(node) if a is not type(None)]
        if get_origin(node) in (Union, UnionType) and len(args) == 1:
            node = args[0]
        elif get_origin(node) is Annotated:
            node = get_args(node)[0]
        else:
            return node


def yaml_line(text: str, path: str) -> int | None:
    """The line of the YAML node at a config path (``tenants.team-a.keys[1].sha256``)."""
    try:
        node: Any = yaml.compose(text, Loader=_StrictLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in re.findall(r"\[(\d+)\]|([^.\[\]]+)", path):
        index, name = part
        if isinstance(node, yaml.SequenceNode) and index and int(index) < len(node.value):
            node = node.value[int(index)]
        elif isinstance(node, yaml.MappingNode) and name:
            found = [(k, v) for k, v in node.value if getattr(k, "value", None) == name]
            if not found:
                break
            line = found[0][0].start_mark.line + 1
            node = found[0][1]
            continue
        else:
            break
        line = node.start_mark.line + 1
    return line


def parse_config(
    data: Any, environ: Mapping[str, str] | None = None, source: str = "<memory>"
) -> LoadedConfig:
    """Validate a parsed YAML document and resolve the secrets it names."""
    env = os.environ if environ is None else environ
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config\n{_format_validation(exc)}") from None
    errors = _cross_check(cfg)

    def secret(var: str, where: str) -> Secret | None:
        value = env.get(var)
        if not value:
            errors.append(f"{where}: environment variable {var} is not set")
            return None
        return Secret(value)

    keys: dict[str, Secret] = {}
    for name, res in cfg.resources.items():
        if res.api_key_env:
            s = secret(res.api_key_env, f"resources.{name}.api_key_env")
            if s:
                keys[name] = s
    client_secret = None
    if cfg.credential.client_secret_env:
        client_secret = secret(cfg.credential.client_secret_env, "credential.client_secret_env")
    redis_url = None
    if cfg.state.backend == "redis" and cfg.state.url_env:
        redis_url = secret(cfg.state.url_env, "state.url_env")
    audit_urls = tuple(
        secret(s.url_env, f"audit.sinks[{i}].url_env") if s.url_env else None
        for i, s in enumerate(cfg.audit.sinks)
    )
    if cfg.audit.path:
        audit_urls = (None, *audit_urls)
    if errors:
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(errors))
    return LoadedConfig(cfg, keys, client_secret, redis_url, source, audit_urls)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping (PyYAML
    keeps the last silently: a pasted second ``team-a:`` block replaced the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class says so
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} at line {line} (first at line {first}); "
                    "each key may appear once in a mapping",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Parse config YAML strictly (duplicate keys refused with their lines)."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, parse and validate the YAML config file at ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_config(data, environ, str(path))
    except ConfigError as exc:
        head, *errors = str(exc).split("\n")
        lines = [head]
        for error in errors:
            where = error.split(": ", 1)[0]
            line = yaml_line(text, where) if where and " " not in where else None
            lines.append(f"{error} (line {line})" if line else error)
        raise ConfigError("\n".join(lines)) from None
