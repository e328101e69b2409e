"""Batch jobs after their upload: output files bound to the tenant, cost charged once.

- A batch answer (create, retrieve, cancel, a list's items) names ``output_file_id`` and
  ``error_file_id`` once Azure has written them: each is bound to the batch's tenant and
  resource the first time it is seen, so the tenant can download it and nobody else can.
- A batch seen ``completed`` is charged: its output file is read from Azure line by line
  (never whole), every line's ``usage`` summed, priced at the batch prices
  (``pricing.batch_prices``) and settled in one state call with the charge-once marker
  ``batch:<id>`` — so however many retrieves, replicas and restarts see it completed, the
  ledger, the budgets and ``gateway_cost_total`` get it once (a settle is atomic: a
  watcher killed mid-charge either charged or did not). Batch tokens do not touch the
  tenant's per-minute token bucket (Azure gives batches their own quota).
- Open batches are registered when created; a **watcher** (one across replicas: it holds
  a lease in the state backend) polls them with backoff, so a completed batch is charged
  within about a minute even if nobody retrieves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from .errors import (
    BadRequest,
    GatewayError,
    RateLimited,
    ServiceUnavailable,
    StateError,
    UpstreamUnavailable,
)
from .headers import gateway_headers
from .pricing import cost_of
from .quotas import MICRO, scopes_for, token_kinds, windows
from .state import Binding, LedgerEntry
from .upstream import UpstreamError
from .validate import parse_upstream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .exchange import Exchange
    from .metrics import Metrics
    from .state import StateBackend
    from .upstream import UpstreamClient

log = logging.getLogger("gateway.batches")


class Parts(Protocol):
    """What the batch desk uses of the gateway (``runtime.Gateway`` has it)."""

    state: StateBackend
    http: UpstreamClient
    snap: Any

    async def auth_header(self, snap: Any, resource: str) -> tuple[str, str]: ...


TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})


class BatchDesk:
    """What the gateway does with batch answers, and the watcher of open batches."""

    def __init__(self, gw: Parts, metrics: Metrics | None = None) -> None:
        self.gw = gw
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self.replica = f"{id(self):x}-{time.time_ns():x}"

    async def observe(self, ex: Exchange, body: dict[str, Any]) -> None:
        """A successful JSON answer of a batch endpoint: bind its files, charge if done."""
        if ex.operation == "batches.create" and isinstance(body.get("id"), str):
            await self.gw.state.batch_open(body["id"])
        items = body.get("data") if body.get("object") == "list" else [body]
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("object") == "batch":
                try:
                    await self.seen(item)
                except StateError as exc:  # the answer goes out; the watcher comes back
                    log.warning("batch not recorded", extra={"reason": exc.message})

    async def admit(self, ex: Exchange, tenant: Any, bindings: list[Binding], file_id: Any) -> None:
        """Before a batch is created: its input file must be a checked batch file, and the
        tenant's budget must cover the estimate of its input (file bytes / 4, at the batch
        input price); else 429 ``budget_exceeded``."""
        file = bindings[0] if bindings else None
        if file is None or file.kind not in ("", "file") or not file.model:
            raise BadRequest(
                "input_file_id must name a file uploaded through this gateway with purpose=batch.",
                code="invalid_batch_file",
                param="input_file_id",
            )
        budgets = tenant.budgets
        price = self.gw.snap.loaded.config.prices.get(file.model)
        if budgets is None or price is None or price.currency != budgets.currency:
            return
        assert ex.principal is not None
        info = await self._get_json(file.resource, f"/openai/v1/files/{file_id}")
        size = info.get("bytes") if isinstance(info, dict) else None
        tokens = size // 4 if isinstance(size, int) else 0
        kinds = {"input": tokens, "cached": 0, "output": 0, "reasoning": 0}
        estimate = cost_of(price, file.resource, kinds, batch=True).amount
        day = windows().day
        spent_day = await self._spent(ex.principal.tenant, [day])
        limits = [("day", budgets.per_day, spent_day)]
        if budgets.per_month is not None:
            month_days = [day[:6] + f"{d:02d}" for d in range(1, int(day[6:]) + 1)]
            spent_month = await self._spent(ex.principal.tenant, month_days)
            limits.append(("month", budgets.per_month, spent_month))
        for period, limit, spent in limits:
            if limit is not None and spent + estimate > limit:
                raise RateLimited(
                    f"This batch's input alone is estimated at {estimate:.4f} "
                    f"{budgets.currency}; with {spent:.4f} spent this {period}, it would go "
                    f"over the tenant's {period} budget of {limit} {budgets.currency}.",
                    code="budget_exceeded",
                    param="input_file_id",
                )

    async def _spent(self, tenant: str, days: list[str]) -> float:
        """Money the tenant's ledger holds for ``days`` (YYYYMMDD), in the budget currency."""
        total = 0
        for day in days:
            rows = await self.gw.state.usage(tenant, day)
            total += sum(r.get("cost_micro", 0) for r in rows.values())
        return total / MICRO

    async def seen(self, batch: dict[str, Any]) -> None:
        bid = batch.get("id")
        if not isinstance(bid, str):
            return
        binding = await self.gw.state.get_binding(bid)
        if binding is None:
            return
        for name in ("output_file_id", "error_file_id"):
            fid = batch.get(name)
            if isinstance(fid, str) and fid:
                known = await self.gw.state.get_binding(fid)
                if known is None:
                    bound = Binding(binding.tenant, binding.resource, binding.model, "file")
                    await self.gw.state.bind_response(fid, bound, self._ttl())
        status = batch.get("status")
        if status == "completed" and isinstance(batch.get("output_file_id"), str):
            try:
                await self.charge(bid, binding, batch)
            except (GatewayError, UpstreamError) as exc:
                # The client's answer does not depend on it: the batch stays registered
                # and the watcher (or the next retrieve) charges it.
                log.warning("batch not charged yet", extra={"batch_id": bid, "reason": str(exc)})
                return
        if status in TERMINAL:
            await self.gw.state.batch_done(bid)

    async def learn_files(self, resource: str) -> None:
        """Bind the output and error files of every open batch on ``resource`` to its
        tenant, asking Azure for each: an adoption must not claim them before anyone has
        fetched them (503 when the batches cannot be read: nothing is adopted then)."""
        try:
            for bid in await self.gw.state.open_batches():
                binding = await self.gw.state.get_binding(bid)
                if binding is None or binding.resource != resource:
                    continue
                body = await self._get_json(resource, f"/openai/v1/batches/{bid}")
                if isinstance(body, dict):
                    await self.seen(body)
        except (GatewayError, UpstreamError) as exc:
            raise ServiceUnavailable(
                "The gateway could not read the batches under way on this resource (an "
                "adoption must not claim their files); retry shortly.",
                code="batches_unavailable",
            ) from exc

    def _ttl(self) -> float:
        return float(self.gw.snap.loaded.config.state.response_retention_days) * 86400.0

    async def charge(self, bid: str, binding: Binding, batch: dict[str, Any]) -> bool:
        """Charge a completed batch once (True when this call did)."""
        gw = self.gw
        if await gw.state.charged(binding.tenant, f"batch:{bid}"):
            return False
        kinds, lines, failed = await self._usage(binding.resource, batch["output_file_id"])
        cfg = gw.snap.loaded.config
        price = cfg.prices.get(binding.model)
        cost = cost_of(price, binding.resource, kinds, batch=True) if price else None
        tenant_cfg = cfg.tenants.get(binding.tenant)
        scopes = scopes_for(binding.tenant, tenant_cfg, binding.model) if tenant_cfg else []
        micro = 0
        budgets = tenant_cfg.budgets if tenant_cfg else None
        if cost and budgets and budgets.currency == cost.currency:
            micro = round(cost.amount * MICRO)
        ledger = None
        if cfg.usage.ledger:
            ledger = LedgerEntry.of(
                binding.tenant,
                binding.model,
                binding.resource,
                kinds,
                cost.amount if cost else 0.0,
                False,
                cfg.usage.retention_days,
            )
        scopes = [s._replace(tpm=0) for s in scopes]  # not the per-minute bucket
        settled = await gw.state.settle(
            scopes, None, 0, windows(), f"batch:{bid}", self._ttl(), micro, ledger
        )
        if not settled.charged:
            return False
        if self.metrics is not None:
            self.metrics.batch_charged(binding.tenant, binding.model, kinds, lines, failed, cost)
        log.info(
            "batch charged",
            extra={
                "tenant": binding.tenant,
                "model": binding.model,
                "batch_id": bid,
                "lines": lines,
                "cost": cost.amount if cost else None,
            },
        )
        return True

    async def _usage(self, resource: str, file_id: str) -> tuple[dict[str, int], int, int]:
        """Token kinds summed over the output file's lines (read as it streams)."""
        total = {"input": 0, "cached": 0, "output": 0, "reasoning": 0}
        lines = failed = 0
        tail = b""
        async for chunk in self._get(resource, f"/openai/v1/files/{file_id}/content"):
            tail += chunk
            *whole, tail = tail.split(b"\n")
            for raw in whole:
                lines, failed = self._line(raw, total, lines, failed)
        if tail.strip():
            lines, failed = self._line(tail, total, lines, failed)
        return total, lines, failed

    @staticmethod
    def _line(raw: bytes, total: dict[str, int], lines: int, failed: int) -> tuple[int, int]:
        if not raw.strip():
            return lines, failed
        try:
            record = json.loads(raw)
            usage = record["response"]["body"]["usage"]
        except (ValueError, KeyError, TypeError):
            return lines + 1, failed + 1
        kinds = token_kinds(usage) if isinstance(usage, dict) else None
        if kinds is None:
            return lines + 1, failed + 1
        for k in total:
            total[k] += kinds.get(k, 0)
        return lines + 1, failed

    async def _get(self, resource: str, path: str) -> AsyncIterator[bytes]:
        """A GET on ``resource`` with the gateway's credential: the body as it arrives."""
        gw = self.gw
        snap = gw.snap
        res = snap.loaded.config.resources[resource]
        auth = await gw.auth_header(snap, resource)
        rid = f"batch-{time.time_ns():x}"
        headers = gateway_headers([], rid, auth)
        resp = await gw.http.send("GET", res.endpoint + path, headers, None, resource)
        try:
            if resp.status >= 300:
                raise UpstreamUnavailable(
                    f"Azure answered {resp.status} reading a batch.", code="upstream_error"
                )
            async for chunk in resp.chunks():
                yield chunk
        finally:
            resp.close()

    async def _get_json(self, resource: str, path: str) -> Any:
        """A GET on ``resource`` whose answer is a JSON object (parsed), or None."""
        return parse_upstream(b"".join([c async for c in self._get(resource, path)]))

    def _poll_seconds(self) -> float:
        return float(self.gw.snap.loaded.config.batches.poll_seconds)

    # -- the watcher ----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        due: dict[str, tuple[float, float]] = {}  # batch id -> (next poll, interval)
        while True:
            await asyncio.sleep(self._poll_seconds())
            try:
                lease = self.gw.snap.loaded.config.batches.lease_seconds
                if not await self.gw.state.lease("batch-watcher", self.replica, lease):
                    continue
                await self.poll(due)
            except (StateError, GatewayError, UpstreamError) as exc:
                log.warning("batch watcher", extra={"reason": type(exc).__name__})
            except Exception:
                log.exception("batch watcher failed")

    async def poll(self, due: dict[str, tuple[float, float]]) -> None:
        """Look at every open batch that is due; charge what completed."""
        now = time.monotonic()
        for bid in await self.gw.state.open_batches():
            when, interval = due.get(bid, (0.0, self._poll_seconds()))
            if when > now:
                continue
            binding = await self.gw.state.get_binding(bid)
            if binding is None:
                await self.gw.state.batch_done(bid)
                continue
            body = await self._get_json(binding.resource, f"/openai/v1/batches/{bid}")
            if isinstance(body, dict):
                await self.seen(body)
            due[bid] = (now + interval, min(interval * 2, 60.0))
