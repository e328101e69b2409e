"""Tenant policy: model allowlists (exact names and ``*`` globs) and region pins."""

from __future__ import annotations

from fnmatch import fnmatchcase

from .config import TenantConfig
from .errors import Forbidden


def model_allowed(tenant: TenantConfig, model: str) -> bool:
    """Whether any of the tenant's model patterns matches ``model``."""
    return any(fnmatchcase(model, pattern) for pattern in tenant.models)


def check_model(tenant_name: str, tenant: TenantConfig, model: str, where: str = "model") -> None:
    """Raise 403 ``model_not_allowed`` unless the tenant may use ``model``."""
    if not model_allowed(tenant, model):
        raise Forbidden(
            f"Tenant '{tenant_name}' is not allowed to use model '{model}' "
            f"(named in {where}); allowed: {', '.join(tenant.models) or 'none'}.",
            code="model_not_allowed",
            param=where,
        )


def check_tools(tenant_name: str, tenant: TenantConfig, tools: object) -> None:
    """Raise 403 ``tool_not_allowed`` for a tool type outside the tenant's list."""
    allowed = tenant.tools.allowed
    if allowed is None or not isinstance(tools, list):
        return
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in allowed:
            raise Forbidden(
                f"Tenant '{tenant_name}' may not use tools of type '{kind}' (tools[{i}]); "
                f"allowed: {', '.join(allowed) or 'none'}.",
                code="tool_not_allowed",
                param=f"tools[{i}].type",
            )
