"""The models a key may use, answered by the gateway itself (``GET /openai/v1/models``).

A model is listed when the tenant's allowlist matches it and at least one of its targets
(interactive or batch) is in the tenant's regions: what the key can actually call. The
shape is OpenAI's list (``id``, ``object: "model"``, ``created``, ``owned_by``) on both
path forms, so ``client.models.list()`` works; a model the key may not use is 404 like
one that does not exist. Nothing goes upstream.
"""

from __future__ import annotations

from typing import Any

from .config import Config, TenantConfig, region_ok
from .errors import NotFound
from .policy import model_allowed


def models(config: Config, tenant: TenantConfig, created: int) -> list[dict[str, Any]]:
    """The models the tenant may call, in config order."""
    out = []
    for name, targets in config.models.items():
        if not model_allowed(tenant, name):
            continue
        if not any(region_ok(tenant, config.resources[t.resource].region) for t in targets):
            continue
        out.append({"id": name, "object": "model", "created": created, "owned_by": "gateway"})
    return out


def listing(config: Config, tenant: TenantConfig, created: int) -> dict[str, Any]:
    """``GET …/models``: OpenAI's list shape."""
    return {"object": "list", "data": models(config, tenant, created)}


def model(config: Config, tenant: TenantConfig, created: int, name: str) -> dict[str, Any]:
    """``GET …/models/{model}``: one model, or 404 as for an unknown one."""
    for entry in models(config, tenant, created):
        if entry["id"] == name:
            return entry
    shown = name[:64].encode("unicode_escape").decode("ascii")
    raise NotFound(f"The model '{shown}' does not exist.", code="model_not_found", param="model")
