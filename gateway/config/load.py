"""YAML → validated, immutable config objects (``models.py``), loudly.

The environment is read here and nowhere else: secrets named by ``*_env`` fields
are resolved into ``LoadedConfig`` at load time, so a missing variable fails at start
with the field that named it. Errors name each bad field path (and its YAML line).
"""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .models import _NAME, Config, TenantConfig, guardrails_of, region_ok
from .regions import unknown_region


class ConfigError(Exception):
    """The config file is unusable; the message names each bad field path."""


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
    loaded_at: float = field(default_factory=time.time)  # the models list's ``created``


def _cross_check(cfg: Config) -> list[str]:
    errors: list[str] = []
    regions = {r.region for r in cfg.resources.values()}
    for name, res in cfg.resources.items():
        if not _NAME.match(name):
            errors.append(f"resources.{name}: names use letters, digits, '.', '_' and '-'")
        if (why := unknown_region(res.region)) is not None:
            errors.append(f"resources.{name}.region: {why}")
    for name, cs in cfg.content_safety.items():
        if (why := unknown_region(cs.region)) is not None:
            errors.append(f"content_safety.{name}.region: {why}")
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
            if (why := unknown_region(region)) is not None:
                errors.append(f"tenants.{tname}.regions[{i}]: {why}")
            elif region not in regions:
                errors.append(f"tenants.{tname}.regions[{i}]: no resource is in region {region!r}")
        errors += _allowlist_errors(cfg, tname, tenant)
        home = tenant.files.resource
        if home is not None and home not in cfg.resources:
            errors.append(f"tenants.{tname}.files.resource: unknown resource {home!r}")
        elif home is not None and not region_ok(tenant, cfg.resources[home].region):
            errors.append(
                f"tenants.{tname}.files.resource: {home!r} is in "
                f"{cfg.resources[home].region}, outside the tenant's regions"
            )
        guard = guardrails_of(cfg, tenant)
        if (
            guard is not None
            and guard.any
            and not any(region_ok(tenant, cs.region) for cs in cfg.content_safety.values())
        ):
            where = "guardrails" if tenant.guardrails is not None else "guardrails (defaults)"
            errors.append(
                f"tenants.{tname}.{where}: no content_safety resource is in the tenant's"
                " regions, so its text cannot be checked there; add one"
            )
        if guard is not None and guard.moderation.output is not None:
            errors.append(
                f"tenants.{tname}.guardrails.moderation.output: output moderation is not"
                " applied by this version yet; remove it rather than rely on it"
            )
        if guard is not None and guard.mode == "parallel":
            errors.append(
                f"tenants.{tname}.guardrails.mode: parallel is not applied by this version"
                " yet; use before"
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


def _allowlist_errors(cfg: Config, tname: str, tenant: TenantConfig) -> list[str]:
    """A tenant's allowlist entries that match no model (a typo goes live otherwise), and
    exact entries whose model no target in the tenant's regions serves."""
    out = []
    for i, pattern in enumerate(tenant.models):
        matched = [m for m in cfg.models if fnmatchcase(m, pattern)]
        where = f"tenants.{tname}.models[{i}]"
        if not matched:
            close = difflib.get_close_matches(pattern, list(cfg.models), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"{where}: {pattern!r} matches no model in models{hint}")
        elif pattern in cfg.models and tenant.regions is not None:
            served = {
                cfg.resources[t.resource].region
                for t in cfg.models[pattern]
                if t.resource in cfg.resources
            }
            if not served & set(tenant.regions):
                out.append(
                    f"{where}: {pattern!r} is deployed only in {', '.join(sorted(served))}, "
                    f"outside the tenant's regions ({', '.join(tenant.regions)})"
                )
    return out


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
    for name, cs in cfg.content_safety.items():
        if cs.api_key_env:
            s = secret(cs.api_key_env, f"content_safety.{name}.api_key_env")
            if s:
                keys[f"content_safety.{name}"] = s
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
