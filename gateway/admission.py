"""The quota gate on the request path: admit before forwarding, settle when done."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import TenantConfig
from .errors import StateError
from .exchange import Exchange
from .quotas import MICRO, QuotaScope, refusal, scopes_for, windows
from .state import LedgerEntry, StateBackend
from .state.guard import StateSkipped

log = logging.getLogger("gateway.quotas")
# How long a request's charge marker lives (requests without a response id): long
# enough for a settle's retry, short enough not to fill Redis.
REQUEST_MARKER_SECONDS = 120.0


class QuotaGate:
    """Admits requests against the tenant's quotas and charges their tokens afterwards."""

    def __init__(
        self,
        state: StateBackend,
        *,
        on_state_error: str = "allow",
        lease_seconds: float = 300.0,
        retention_seconds: float = 30 * 86400.0,
        on_error: Callable[[str], None] | None = None,
        on_budget_warning: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.state = state
        self.on_state_error = on_state_error
        self.lease_seconds = lease_seconds
        self.retention = retention_seconds
        self._on_error = on_error
        self._on_budget_warning = on_budget_warning

    def _state_failed(self, what: str, exc: StateError) -> None:
        if self._on_error:
            self._on_error(what)
        if not isinstance(exc, StateSkipped):  # skips are counted, not logged one by one
            log.error(
                "state backend failed",
                extra={"operation": what, "policy": self.on_state_error, "reason": exc.message},
            )

    async def admit(
        self,
        ex: Exchange,
        tenant_name: str,
        tenant: TenantConfig,
        model: str,
        part: str = "all",
    ) -> None:
        """Admit ``ex`` or raise the 429 (or, with ``deny``, the 503) that refuses it.

        ``part``: ``all`` the tenant's limits; ``slot`` only a concurrency slot (a
        WebSocket connection holds one for its life); ``rate`` all but the slot (each
        ``response.create`` on a socket).
        """
        scopes = scopes_for(tenant_name, tenant, model)
        if part == "slot":
            scopes = [
                s._replace(rpm=0, tpm=0, tpd=0, tpmonth=0, cost_day=0, cost_month=0)
                for s in scopes
                if s.concurrency
            ]
        elif part == "rate":
            scopes = [s._replace(concurrency=0) for s in scopes]
        ex.quota_scopes = scopes
        if not scopes:
            return
        if tenant.budgets is not None:
            ex.budget_currency = tenant.budgets.currency
            ex.budget_warn_at = tenant.budgets.warn_at
        try:
            adm = await self.state.admit(scopes, ex.request_id, self.lease_seconds, windows())
        except StateError as exc:
            self._state_failed("admit", exc)
            ex.quota_scopes = []
            if not isinstance(exc, StateSkipped) and any(s.concurrency for s in scopes):
                # The lease may have been taken with only the answer lost: give it back.
                await self.state.settle(scopes, ex.request_id, 0, windows(), None, 0)
            if self.on_state_error == "deny":
                raise
            return
        ex.admission = adm
        if not adm.allowed:
            ex.quota_scopes = []
            ex.quota_reason = adm.reason
            raise refusal(adm, tenant_name, scopes, ex.budget_currency or "")
        ex.leased = any(s.concurrency for s in scopes)

    def charge_only(self, ex: Exchange, tenant_name: str, tenant: TenantConfig, model: str) -> None:
        """Work that was refused but ran (a response the upstream started, then cancelled):
        its tokens and cost are charged when it settles, with no request or slot taken."""
        scopes = scopes_for(tenant_name, tenant, model)
        ex.quota_scopes = [s._replace(concurrency=0) for s in scopes]
        if tenant.budgets is not None:
            ex.budget_currency = tenant.budgets.currency

    async def settle(self, ex: Exchange, ledger: LedgerEntry | None = None) -> None:
        """Release the lease, charge the tokens (or an estimate) and the cost, and add the
        exchange to the usage ledger: one state call."""
        scopes = ex.quota_scopes
        if not scopes and ledger is None:
            return
        ex.quota_scopes = []
        tokens = ex.estimated_tokens
        kinds = ex.usage_kinds()
        if ex.usage and kinds is not None:
            total = ex.usage.get("total_tokens")
            tokens = total if isinstance(total, int) else kinds["input"] + kinds["output"]
        cost = 0
        if ex.cost and ex.currency and ex.currency == ex.budget_currency:
            cost = round(ex.cost * MICRO)
        lease = ex.request_id if ex.leased else None
        if lease is None and tokens <= 0 and cost <= 0 and ledger is None:
            return
        # Charged once per response id (a background response's later retrieves), or per
        # request: a settle tried again (its answer read late, ``state/guard.py``) is a no-op.
        once, ttl = ex.response_id, self.retention
        if once is None:
            once, ttl = f"rq:{ex.request_id}", REQUEST_MARKER_SECONDS
        try:
            settled = await self.state.settle(
                scopes, lease, max(tokens, 0), windows(), once, ttl, cost, ledger
            )
        except StateError as exc:
            self._state_failed("settle", exc)
            return
        if cost and settled.charged:
            self._warn(ex, scopes, settled.spent, cost)

    def _warn(
        self, ex: Exchange, scopes: list[QuotaScope], spent: tuple[tuple[int, int], ...], cost: int
    ) -> None:
        """Warn (log + metric) when this charge crossed a budget's soft threshold."""
        for scope, (day, month) in zip(scopes, spent, strict=False):
            for period, limit, after in (
                ("day", scope.cost_day, day),
                ("month", scope.cost_month, month),
            ):
                threshold = limit * ex.budget_warn_at
                if limit and after - cost < threshold <= after:
                    log.warning(
                        "budget threshold crossed",
                        extra={
                            "tenant": scope.tenant,
                            "model": scope.model or None,
                            "period": period,
                            "spent": after / MICRO,
                            "budget": limit / MICRO,
                            "currency": ex.budget_currency,
                        },
                    )
                    if self._on_budget_warning:
                        self._on_budget_warning(scope.tenant, scope.model, period)
