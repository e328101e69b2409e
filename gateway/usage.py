"""The usage ledger as a report: per tenant x model x UTC day, in CSV or JSON.

Rows hold requests, tokens by kind, cost (in the model's price currency) and the share
charged by estimate (streams cut before Azure reported usage). The ledger lives in the
state backend: Redis hashes ``gw:{TENANT}:u:YYYYMMDD`` kept ``usage.retention_days``; with
the memory backend, inside the running process (read it through ``/admin/usage``).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date, timedelta
from typing import Any

from .config import Config
from .quotas import MICRO
from .state import StateBackend

COLUMNS = (
    "date",
    "tenant",
    "model",
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost",
    "currency",
    "estimated_requests",
    "estimated_cost",
)
MAX_DAYS = 400


class UsageQueryError(ValueError):
    """A report request that cannot be answered; the message says why."""


def days(start: str, end: str) -> list[date]:
    """The UTC days from ``start`` to ``end`` (YYYY-MM-DD), both included."""
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError:
        raise UsageQueryError("dates are YYYY-MM-DD, e.g. 2026-11-01") from None
    if last < first:
        raise UsageQueryError(f"'to' ({end}) is before 'from' ({start})")
    count = (last - first).days + 1
    if count > MAX_DAYS:
        raise UsageQueryError(f"at most {MAX_DAYS} days per report")
    return [first + timedelta(days=n) for n in range(count)]


async def report(
    state: StateBackend, config: Config, start: str, end: str, tenant: str | None = None
) -> list[dict[str, Any]]:
    """The ledger rows of the days from ``start`` to ``end`` for one tenant or all."""
    if tenant is not None and tenant not in config.tenants:
        raise UsageQueryError(f"unknown tenant {tenant!r}")
    tenants = [tenant] if tenant else sorted(config.tenants)
    rows: list[dict[str, Any]] = []
    for day in days(start, end):
        for name in tenants:
            ledger = await state.usage(name, day.strftime("%Y%m%d"))
            for model in sorted(ledger):
                f = ledger[model]
                price = config.prices.get(model)
                rows.append(
                    {
                        "date": day.isoformat(),
                        "tenant": name,
                        "model": model,
                        "requests": f.get("requests", 0),
                        "input_tokens": f.get("input_tokens", 0),
                        "cached_tokens": f.get("cached_tokens", 0),
                        "output_tokens": f.get("output_tokens", 0),
                        "reasoning_tokens": f.get("reasoning_tokens", 0),
                        "cost": f.get("cost_micro", 0) / MICRO,
                        "currency": price.currency if price else "",
                        "estimated_requests": f.get("estimated_requests", 0),
                        "estimated_cost": f.get("estimated_cost_micro", 0) / MICRO,
                    }
                )
    return rows


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """The rows as CSV (a header line first) or as a JSON array."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
