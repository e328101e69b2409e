"""In-memory state for a single replica (asyncio makes each method atomic).

Bounded: bindings and charge markers are capped at ``max_bindings`` each (oldest
evicted first) and pruned as they expire; day and month counters of past windows are
dropped when the window turns; buckets and leases are per configured tenant+model.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from ..quotas import Admission, QuotaScope, Windows
from . import Binding, LedgerEntry, Settled, ledger_increments


class _Bucket:
    __slots__ = ("level", "ts")

    def __init__(self, level: float, ts: float) -> None:
        self.level = level
        self.ts = ts

    def refill(self, cap: int, now: float) -> float:
        if now > self.ts:  # the clock never moves back: an older time refills nothing
            self.level = min(float(cap), self.level + (now - self.ts) * cap / 60.0)
            self.ts = now
        return self.level


def add_to_windows(
    counters: dict[tuple[str, str, str], int], s: QuotaScope, w: Windows, tokens: int, cost: int
) -> None:
    """Add ``tokens`` and ``cost`` to the scope's day and month counters (money under "$")."""
    for window, amount in (
        (w.day, tokens),
        (w.month, tokens),
        ("$" + w.day, cost),
        ("$" + w.month, cost),
    ):
        key = (s.tenant, s.model, window)
        counters[key] = counters.get(key, 0) + amount


class MemoryState:
    """Response bindings and quota counters in dicts; bindings evicted oldest first."""

    # No method ever suspends, so a settle cannot be cut by a cancellation half-way:
    # the lifecycle awaits it directly instead of shielding it in a task.
    local = True

    def __init__(self, max_bindings: int = 250_000) -> None:
        self._bindings: OrderedDict[str, tuple[Binding, float]] = OrderedDict()
        self._max = max_bindings
        self._pruned_on: tuple[str, float] = ("", 0.0)
        self._buckets: dict[tuple[str, str, str], _Bucket] = {}
        self._counters: dict[tuple[str, str, str], int] = {}
        self._leases: dict[tuple[str, str], dict[str, float]] = {}
        self._charged: OrderedDict[str, float] = OrderedDict()
        self._batches: dict[str, None] = {}
        self._windows: tuple[str, str] = ("", "")
        self._ledger: dict[tuple[str, str], dict[tuple[str, str], dict[str, int]]] = {}

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        now = time.monotonic()
        bindings = self._bindings
        bindings[response_id] = (binding, now + ttl)
        bindings.move_to_end(response_id)
        while bindings and (len(bindings) > self._max or next(iter(bindings.values()))[1] <= now):
            bindings.popitem(last=False)

    async def get_binding(self, response_id: str) -> Binding | None:
        item = self._bindings.get(response_id)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            del self._bindings[response_id]
            return None
        return item[0]

    async def delete_binding(self, response_id: str) -> None:
        self._bindings.pop(response_id, None)

    def _bucket(self, s: QuotaScope, kind: str, cap: int, now: float) -> _Bucket:
        key = (s.tenant, s.model, kind)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(float(cap), now)
        b.refill(cap, now)
        return b

    def _live_leases(self, s: QuotaScope, now: float) -> dict[str, float]:
        leases = self._leases.setdefault((s.tenant, s.model), {})
        for lid in [lid for lid, exp in leases.items() if exp <= now]:
            del leases[lid]
        return leases

    async def admit(
        self, scopes: list[QuotaScope], lease: str, lease_ttl: float, w: Windows
    ) -> Admission:
        now = w.now
        first: Admission | None = None
        for index, s in enumerate(scopes):
            req = self._bucket(s, "rq", s.rpm, now) if s.rpm else None
            tok = self._bucket(s, "tk", s.tpm, now) if s.tpm else None
            reason, retry = None, 0.0
            if req is not None and req.level < 1:
                reason, retry = "requests_per_minute", (1 - req.level) * 60 / s.rpm
            elif tok is not None and tok.level <= 0:
                reason, retry = "tokens_per_minute", (1 - tok.level) * 60 / s.tpm
            elif s.tpd and self._counters.get((s.tenant, s.model, w.day), 0) >= s.tpd:
                reason, retry = "tokens_per_day", w.day_left
            elif s.tpmonth and self._counters.get((s.tenant, s.model, w.month), 0) >= s.tpmonth:
                reason, retry = "tokens_per_month", w.month_left
            elif (
                s.cost_day and self._counters.get((s.tenant, s.model, "$" + w.day), 0) >= s.cost_day
            ):
                reason, retry = "budget_per_day", w.day_left
            elif (
                s.cost_month
                and self._counters.get((s.tenant, s.model, "$" + w.month), 0) >= s.cost_month
            ):
                reason, retry = "budget_per_month", w.month_left
            elif s.concurrency and len(self._live_leases(s, now)) >= s.concurrency:
                reason, retry = "max_concurrent_requests", 1.0
            adm = Admission(
                reason is None,
                reason,
                retry,
                s.rpm,
                int(req.level) - (reason is None) if req else 0,
                (s.rpm - (req.level - 1)) * 60 / s.rpm if req else 0.0,
                s.tpm,
                int(tok.level) if tok else 0,
                max(0.0, (s.tpm - tok.level) * 60 / s.tpm) if tok else 0.0,
                lease,
                index,
            )
            if reason is not None:
                return adm
            first = first or adm
        for s in scopes:
            if s.rpm:
                self._bucket(s, "rq", s.rpm, now).level -= 1
            if s.concurrency:
                self._live_leases(s, now)[lease] = now + lease_ttl
        return first or Admission(True, lease=lease)

    def _charge_once(self, once: str, w: Windows, ttl: float) -> bool:
        charged = self._charged
        while charged:
            oldest, expiry = next(iter(charged.items()))
            if expiry > w.now and len(charged) < self._max:
                break
            del charged[oldest]
        if charged.get(once, 0) > w.now:
            return False
        charged[once] = w.now + ttl
        charged.move_to_end(once)
        return True

    def _turn_windows(self, w: Windows) -> None:
        if self._windows != (w.day, w.month):
            self._windows = (w.day, w.month)
            current = {w.day, w.month, "$" + w.day, "$" + w.month}
            self._counters = {k: v for k, v in self._counters.items() if k[2] in current}

    async def settle(
        self,
        scopes: list[QuotaScope],
        lease: str | None,
        tokens: int,
        w: Windows,
        once: str | None,
        ttl: float,
        cost: int = 0,
        ledger: LedgerEntry | None = None,
    ) -> Settled:
        if lease:
            for s in scopes:
                self._leases.get((s.tenant, s.model), {}).pop(lease, None)
        if tokens <= 0 and cost <= 0 and ledger is None:
            return Settled(False)
        if once is not None and not self._charge_once(once, w, ttl):
            return Settled(False)
        self._turn_windows(w)
        if ledger is not None:
            day = self._ledger.setdefault((ledger.tenant, w.day), {})
            row = day.setdefault((ledger.model, ledger.resource), {})
            for field, value in ledger_increments(ledger).items():
                row[field] = row.get(field, 0) + value
            self._prune_ledger(w, ledger.ttl)
        counters = self._counters
        spent = []
        for s in scopes:
            if s.tpm and tokens > 0:
                self._bucket(s, "tk", s.tpm, w.now).level -= tokens
            add_to_windows(counters, s, w, tokens, cost)
            spent.append(
                (
                    counters[(s.tenant, s.model, "$" + w.day)],
                    counters[(s.tenant, s.model, "$" + w.month)],
                )
            )
        return Settled(True, tuple(spent))

    def _prune_ledger(self, w: Windows, ttl: float) -> None:
        """Drop ledger days older than ``ttl``: a walk over every row, so once per UTC day."""
        if self._pruned_on == (w.day, ttl):
            return
        self._pruned_on = (w.day, ttl)
        oldest = time.strftime("%Y%m%d", time.gmtime(w.now - ttl))
        for key in [k for k in self._ledger if k[1] < oldest]:
            del self._ledger[key]

    async def usage(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        row = self._ledger.get((tenant, day), {})
        return {key: dict(fields) for key, fields in row.items()}

    async def charged(self, tenant: str, once: str) -> bool:
        return self._charged.get(once, 0) > time.time()

    async def batch_open(self, batch_id: str) -> None:
        self._batches[batch_id] = None

    async def batch_done(self, batch_id: str) -> None:
        self._batches.pop(batch_id, None)

    async def open_batches(self) -> list[str]:
        return list(self._batches)

    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        return True  # one replica: it always holds it

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
