"""The usage ledger as a report: per tenant x model x UTC day, in CSV or JSON.

Rows hold requests, tokens by kind, cost (in the model's price currency), the share
charged by estimate (streams cut before Azure reported usage), and ``ptu_cost``: the
``hourly`` cost of a resource's price override (a PTU deployment) for the day — 24 hours,
or the hours so far today — spread over the tenants by their share of the tokens that
model used on that resource that day. The ledger lives in the
state backend: Redis hashes ``gw:{TENANT}:u:YYYYMMDD`` kept ``usage.retention_days``; with
the memory backend, inside the running process (read it through ``/admin/usage``).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

from .config import Config
from .quotas import MICRO
from .state import LEDGER_FIELDS, LedgerReader

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
    "ptu_cost",
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


def _hours(day: date) -> float:
    """Hours of ``day`` (UTC) that have passed: 24, or the part of today so far."""
    now = datetime.now(UTC)
    if day < now.date():
        return 24.0
    if day > now.date():
        return 0.0
    return now.hour + now.minute / 60 + now.second / 3600


async def report(
    state: LedgerReader, config: Config, start: str, end: str, tenant: str | None = None
) -> list[dict[str, Any]]:
    """The ledger rows of the days from ``start`` to ``end`` for one tenant or all."""
    if tenant is not None and tenant not in config.tenants:
        raise UsageQueryError(f"unknown tenant {tenant!r}")
    rows: list[dict[str, Any]] = []
    for day in days(start, end):
        stamp = day.strftime("%Y%m%d")
        # Every tenant's ledger is read: a PTU's cost is shared by all of its users.
        ledgers = {name: await state.usage(name, stamp) for name in sorted(config.tenants)}
        ptu_tokens: dict[tuple[str, str], int] = {}
        for ledger in ledgers.values():
            for key, f in ledger.items():
                ptu_tokens[key] = ptu_tokens.get(key, 0) + _tokens(f)
        for name, ledger in ledgers.items():
            if tenant is not None and name != tenant:
                continue
            by_model: dict[str, dict[str, float]] = {}
            for (model, resource), f in ledger.items():
                row = by_model.setdefault(model, dict.fromkeys((*LEDGER_FIELDS, "ptu"), 0.0))
                for field in LEDGER_FIELDS:
                    row[field] += f.get(field, 0)
                price = config.prices.get(model)
                override = price.resources.get(resource) if price else None
                if override is not None and override.hourly and ptu_tokens[(model, resource)]:
                    share = _tokens(f) / ptu_tokens[(model, resource)]
                    row["ptu"] += override.hourly * _hours(day) * share
            for model in sorted(by_model):
                r = by_model[model]
                price = config.prices.get(model)
                rows.append(
                    {
                        "date": day.isoformat(),
                        "tenant": name,
                        "model": model,
                        "requests": int(r["requests"]),
                        "input_tokens": int(r["input_tokens"]),
                        "cached_tokens": int(r["cached_tokens"]),
                        "output_tokens": int(r["output_tokens"]),
                        "reasoning_tokens": int(r["reasoning_tokens"]),
                        "cost": r["cost_micro"] / MICRO,
                        "currency": price.currency if price else "",
                        "estimated_requests": int(r["estimated_requests"]),
                        "estimated_cost": r["estimated_cost_micro"] / MICRO,
                        "ptu_cost": round(r["ptu"], 6),
                    }
                )
    return rows


def _tokens(fields: dict[str, int]) -> int:
    return fields.get("input_tokens", 0) + fields.get("output_tokens", 0)


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """The rows as CSV (a header line first) or as a JSON array."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    # Money to the micro-unit the ledger counts in, never in exponent form (1e-06).
    writer.writerows(
        {k: f"{v:.6f}" if k in MONEY and isinstance(v, float) else v for k, v in row.items()}
        for row in rows
    )
    return out.getvalue()


MONEY = frozenset({"cost", "estimated_cost", "ptu_cost"})
