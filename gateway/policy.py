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


def region_allowed(tenant: TenantConfig, region: str) -> bool:
    """Whether the tenant's residency pin (if any) admits ``region``."""
    return tenant.regions is None or region in tenant.regions
