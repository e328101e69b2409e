"""Quota admission and token accounting, over a state backend.

Strategy (the same on every backend, atomic per request):
- ``requests_per_minute``: a token bucket of ``rpm`` requests refilling at rpm/60 per
  second. A request takes one; an empty bucket refuses (429, ``Retry-After`` = time
  to the next request).
- ``tokens_per_minute``: a bucket of ``tpm`` tokens refilling at tpm/60 per second,
  charged with Azure's ``usage.total_tokens`` when the response ends. A request is
  admitted while the bucket is above zero; the last admitted requests may take it
  below zero (debt), which later refills. Overshoot is therefore bounded by the
  tokens of the requests in flight when the budget ran out.
- ``tokens_per_day`` / ``tokens_per_month``: counters per UTC day / month. A spent
  budget refuses with 429 ``insufficient_quota`` and ``x-should-retry: false``.
- ``max_concurrent_requests``: leases (request id → expiry) released when the
  response ends; a replica that dies leaves leases that expire after ``lease_seconds``.

Each of these applies per tenant (``quotas``) and per tenant+model (``model_quotas``).
"""

from __future__ import annotations

import calendar
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

from .config import BudgetLimits, QuotaConfig, TenantConfig
from .errors import RateLimited

REASONS = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "max_concurrent_requests",
    "budget_per_day",
    "budget_per_month",
)
MICRO = 1_000_000  # money is counted in millionths of the currency unit


class QuotaScope(NamedTuple):
    """The limits of one scope: a tenant (model "") or a tenant+model."""

    tenant: str
    model: str
    rpm: int
    tpm: int
    tpd: int
    tpmonth: int
    concurrency: int
    cost_day: int = 0  # budget per UTC day, in millionths of the currency
    cost_month: int = 0


class Windows(NamedTuple):
    """Calendar windows at one instant: ids and seconds left."""

    now: float
    day: str
    day_left: float
    month: str
    month_left: float


class Admission(NamedTuple):
    """The outcome of admitting one request; headers and metrics read from it."""

    allowed: bool
    reason: str | None = None
    retry_after: float = 0.0
    limit_requests: int = 0
    remaining_requests: int = 0
    reset_requests: float = 0.0
    limit_tokens: int = 0
    remaining_tokens: int = 0
    reset_tokens: float = 0.0
    lease: str | None = None
    scope: int = 0  # which scope refused (an index into the request's scopes)


UNLIMITED = Admission(True)


# The UTC day last computed: (day start, day end, YYYYMMDD, YYYYMM, month end).
_day: tuple[float, float, str, str, float] = (0.0, 0.0, "", "", 0.0)


def windows(now: float | None = None) -> Windows:
    """The UTC day and month containing ``now`` (the calendar work is done once a day)."""
    global _day
    t = time.time() if now is None else now
    start, end, day, month, month_end = _day
    if not start <= t < end:
        d = datetime.fromtimestamp(t, UTC)
        start = datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()
        days = calendar.monthrange(d.year, d.month)[1]
        month_start = datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()
        end, month_end = start + 86400, month_start + days * 86400
        day, month = d.strftime("%Y%m%d"), d.strftime("%Y%m")
        _day = (start, end, day, month, month_end)
    return Windows(t, day, end - t, month, month_end - t)


def _scope(
    tenant: str, model: str, q: QuotaConfig | None, b: BudgetLimits | None
) -> QuotaScope | None:
    q = q or QuotaConfig()
    values = (
        q.requests_per_minute or 0,
        q.tokens_per_minute or 0,
        q.tokens_per_day or 0,
        q.tokens_per_month or 0,
        q.max_concurrent_requests or 0,
        round((b.per_day or 0) * MICRO) if b else 0,
        round((b.per_month or 0) * MICRO) if b else 0,
    )
    if not any(values):
        return None
    return QuotaScope(tenant, model, *values)


def scopes_for(tenant_name: str, tenant: TenantConfig, model: str | None) -> list[QuotaScope]:
    """The quota scopes a request of ``tenant`` for ``model`` must pass."""
    out = []
    budgets = tenant.budgets
    base = _scope(tenant_name, "", tenant.quotas, budgets)
    if base:
        out.append(base)
    model_budget = budgets.models.get(model) if budgets and model else None
    if model and (model in tenant.model_quotas or model_budget):
        per_model = _scope(tenant_name, model, tenant.model_quotas.get(model), model_budget)
        if per_model:
            out.append(per_model)
    return out


def ratelimit_headers(adm: Admission) -> dict[str, str]:
    """``x-ratelimit-*`` headers describing the tenant's own quota."""
    h: dict[str, str] = {}
    if adm.limit_requests:
        h["x-ratelimit-limit-requests"] = str(adm.limit_requests)
        h["x-ratelimit-remaining-requests"] = str(max(adm.remaining_requests, 0))
        h["x-ratelimit-reset-requests"] = f"{adm.reset_requests:.3f}s"
    if adm.limit_tokens:
        h["x-ratelimit-limit-tokens"] = str(adm.limit_tokens)
        h["x-ratelimit-remaining-tokens"] = str(max(adm.remaining_tokens, 0))
        h["x-ratelimit-reset-tokens"] = f"{adm.reset_tokens:.3f}s"
    return h


def _money(amount: float) -> str:
    """An amount as people write it: cents, or as many digits as a small budget needs."""
    return f"{amount:.2f}" if amount >= 1 or amount == 0 else f"{amount:.6f}".rstrip("0")


def refusal(
    adm: Admission, tenant: str, scopes: list[QuotaScope] | None = None, currency: str = ""
) -> RateLimited:
    """The 429 a refused admission answers with."""
    headers = ratelimit_headers(adm)
    retry = max(adm.retry_after, 0.001)
    headers["retry-after"] = str(max(1, int(retry + 0.999)))
    headers["retry-after-ms"] = str(int(retry * 1000))
    reason = adm.reason or "quota"
    if reason in ("budget_per_day", "budget_per_month") and scopes:
        headers["x-should-retry"] = "false"
        scope = scopes[min(adm.scope, len(scopes) - 1)]
        day = reason == "budget_per_day"
        limit = (scope.cost_day if day else scope.cost_month) / MICRO
        which = f" for model '{scope.model}'" if scope.model else ""
        return RateLimited(
            f"Tenant '{tenant}' has spent its budget of {_money(limit)} {currency}{which} for this "
            f"{'day' if day else 'month'} (UTC); it resets in {int(retry)} s. Ask your "
            "platform team to raise it.",
            code="insufficient_quota",
            headers=headers,
        )
    if reason in ("tokens_per_day", "tokens_per_month"):
        headers["x-should-retry"] = "false"
        period = "day" if reason == "tokens_per_day" else "month"
        return RateLimited(
            f"Tenant '{tenant}' has spent its token budget for this {period} ({reason}); "
            f"it resets in {int(retry)} s. Ask your platform team to raise it.",
            code="insufficient_quota",
            headers=headers,
        )
    what = {
        "requests_per_minute": "request rate limit",
        "tokens_per_minute": "token rate limit",
        "max_concurrent_requests": "limit of concurrent requests",
    }.get(reason, reason)
    return RateLimited(
        f"Tenant '{tenant}' is over its {what} ({reason}); retry after {retry:.3f} s.",
        code="rate_limit_exceeded",
        headers=headers,
    )


def estimate_tokens(request_bytes: int, output_events: int) -> int:
    """Tokens to charge for a stream cut before its usage arrived."""
    return request_bytes // 4 + output_events


def token_kinds(usage: dict[str, Any]) -> dict[str, int]:
    """Input, cached, output and reasoning token counts of a ``usage`` object (Responses
    names, or the chat/embeddings ``prompt_tokens``/``completion_tokens`` names)."""

    def num(value: Any) -> int:
        return value if isinstance(value, int) and value >= 0 else 0

    if "input_tokens" not in usage and "prompt_tokens" in usage:  # chat, embeddings, completions
        in_details = usage.get("prompt_tokens_details") or {}
        out_details = usage.get("completion_tokens_details") or {}
        tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:  # Responses (…_tokens_details) and Realtime (…_token_details, with audio)
        in_details = usage.get("input_tokens_details") or usage.get("input_token_details") or {}
        out_details = usage.get("output_tokens_details") or usage.get("output_token_details") or {}
        tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
    if not isinstance(in_details, dict):
        in_details = {}
    if not isinstance(out_details, dict):
        out_details = {}
    return {
        "input": num(tokens_in),
        "cached": num(in_details.get("cached_tokens")),
        "output": num(tokens_out),
        "reasoning": num(out_details.get("reasoning_tokens")),
        "audio_input": num(in_details.get("audio_tokens")),
        "audio_output": num(out_details.get("audio_tokens")),
    }
