"""Tenant + model → the ordered upstream targets that may serve a request.

Order: priority groups, lowest first (a plain list gives each entry its own priority,
in list order, as it always did); within a group, a weighted random order, so traffic
splits by ``weight``. The first target whose breaker admits the request gets it; the
rest are the failover list before the first byte.
"""

from __future__ import annotations

import random
from fnmatch import fnmatchcase
from typing import NamedTuple

from .config import Config, TenantConfig
from .config import region_ok as region_allowed
from .errors import BadRequest, Forbidden, NotFound
from .policy import check_model


class Target(NamedTuple):
    """One Azure deployment on one resource."""

    resource: str
    endpoint: str
    region: str
    deployment: str
    priority: int = 0
    weight: float = 1.0

    @property
    def key(self) -> str:
        """The breaker's name for this target."""
        return f"{self.resource}/{self.deployment}"


def weighted_order(targets: tuple[Target, ...], rng: random.Random) -> tuple[Target, ...]:
    """Priority groups in order; each group shuffled with probability by weight."""
    if len(targets) < 2:
        return targets
    # Efraimidis-Spirakis: sorting by u^(1/w) draws a weighted permutation.
    keyed = sorted(targets, key=lambda t: (t.priority, -(rng.random() ** (1.0 / t.weight))))
    return tuple(keyed)


class Router:
    """Resolves logical model names to deployments, honouring policy."""

    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or random.Random()

        def resolved(model: str, batch: bool) -> tuple[Target, ...]:
            return tuple(
                Target(
                    t.resource,
                    config.resources[t.resource].endpoint,
                    config.resources[t.resource].region,
                    t.deployment,
                    i if t.priority is None else t.priority,
                    t.weight,
                )
                for i, t in enumerate(config.models[model])
                if t.batch is batch
            )

        # Interactive targets, and batch deployments apart: neither ever serves the other.
        self._targets = {m: resolved(m, False) for m in config.models}
        self._batch = {m: resolved(m, True) for m in config.models}

    def all_targets(self) -> list[Target]:
        """Every configured target once (for metrics and shared breaker state)."""
        seen: dict[str, Target] = {}
        for targets in self._targets.values():
            for t in targets:
                seen.setdefault(t.key, t)
        return list(seen.values())

    def targets(
        self, tenant_name: str, tenant: TenantConfig, model: str, pinned: str | None = None
    ) -> tuple[Target, ...]:
        """Targets for ``model`` in fallback order, filtered by allowlist, region and pin."""
        targets = self._known(self._targets, tenant_name, tenant, model, "model")
        if not targets:
            raise BadRequest(
                f"Model '{model}' has only batch deployments on this gateway; send it in a "
                "batch job (POST /openai/v1/batches).",
                code="model_batch_only",
                param="model",
            )
        return self._allowed(tenant_name, tenant, model, targets, pinned)

    def batch_targets(
        self,
        tenant_name: str,
        tenant: TenantConfig,
        model: str,
        where: str = "model",
        pinned: str | None = None,
    ) -> tuple[Target, ...]:
        """The batch deployments of ``model`` the tenant may use (on ``pinned`` when
        given), in priority order."""
        targets = self._known(self._batch, tenant_name, tenant, model, where)
        if not targets:
            raise BadRequest(
                f"Model '{model}' has no batch deployment on this gateway; batch jobs run "
                "only on deployments marked batch: true.",
                code="model_not_batch",
                param=where,
            )
        allowed = self._allowed(tenant_name, tenant, model, targets, pinned, where)
        return tuple(sorted(allowed, key=lambda t: t.priority))

    @staticmethod
    def _known(
        table: dict[str, tuple[Target, ...]],
        tenant_name: str,
        tenant: TenantConfig,
        model: str,
        where: str,
        named: bool = False,
    ) -> tuple[Target, ...]:
        """``model``'s targets in ``table`` once the tenant may use it; 404 if unknown
        (``named``: the model came from ``where``, not the request's own ``model``)."""
        check_model(tenant_name, tenant, model, where)
        targets = table.get(model)
        if targets is None:
            named_in = f" named in {where}" if named else ""
            raise NotFound(
                f"The model '{model}'{named_in} does not exist on this gateway.",
                code="model_not_found",
                param=where,
            )
        return targets

    def _allowed(
        self,
        tenant_name: str,
        tenant: TenantConfig,
        model: str,
        targets: tuple[Target, ...],
        pinned: str | None,
        where: str = "model",
    ) -> tuple[Target, ...]:
        allowed = tuple(t for t in targets if region_allowed(tenant, t.region))
        if not allowed:
            raise Forbidden(
                f"Model '{model}' is only deployed in "
                f"{', '.join(sorted({t.region for t in targets}))}, and tenant '{tenant_name}' "
                f"is pinned to regions {', '.join(tenant.regions or ())} (data residency).",
                code="region_not_allowed",
                param=where,
            )
        if pinned is not None:
            allowed = tuple(t for t in allowed if t.resource == pinned)
            if not allowed:
                raise BadRequest(
                    f"Model '{model}' has no deployment on the resource that holds the "
                    "objects this request names; use a model deployed there.",
                    code="model_not_on_resource",
                    param="model",
                )
        return weighted_order(allowed, self._rng)

    def home(self, tenant_name: str, tenant: TenantConfig) -> str:
        """The resource where the tenant's uploads and other unrouted objects land:
        ``tenants.NAME.files.resource``, else the first resource (in config order) serving
        the tenant's first allowed model in its regions."""
        if tenant.files.resource is not None:
            return tenant.files.resource
        for pattern in tenant.models:
            for model, targets in self._targets.items():
                if not fnmatchcase(model, pattern):
                    continue
                for t in targets:
                    if region_allowed(tenant, t.region):
                        return t.resource
        raise Forbidden(
            f"Tenant '{tenant_name}' has no resource for stored objects: it may use no model "
            "deployed in its regions, and tenants.NAME.files.resource is not set.",
            code="no_home_resource",
        )

    def deployment_on(
        self, tenant_name: str, tenant: TenantConfig, model: str, resource: str, where: str
    ) -> str | None:
        """The deployment of an extra model (a tool's, a header's) on ``resource``."""
        targets = self._known(self._targets, tenant_name, tenant, model, where, named=True)
        for t in targets:
            if t.resource == resource and region_allowed(tenant, t.region):
                return t.deployment
        return None
