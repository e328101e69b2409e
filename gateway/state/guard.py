"""A shared state backend (Redis) behind a circuit breaker, with retries of what must land.

- **Breaker, per node**: a timeout or connection error opens the breaker of the node
  that served the call (the one server, or the cluster shard owning the key's slot) for
  ``breaker_seconds``; while open, calls to that node fail at once with
  ``StateSkipped`` (no round trip), so a black-holed Redis costs one timeout per
  interval, not one per request, and a dead shard does not touch tenants on the others.
  When the interval is over, one call is the probe (others keep skipping until it
  answers): success closes the breaker, failure opens it again.
- **What must land is retried**: a settle (lease release + token charge) or a binding
  that fails is queued (at most ``queue_size`` entries; beyond that the oldest is
  dropped and counted) and written by a drainer task once the breaker closes, in
  order. A binding waiting in the queue is also kept on this replica and answered
  from there, so a response created during an outage is never a 404 here.
- **A late loop is not a silent Redis**: a burst that keeps the event loop busy makes
  Redis's answers be read after the timeout although Redis answered at once. A call
  that timed out while the loop was late (the call took a quarter longer than the
  timeout, or the loop's measured lag is over a quarter of it) is tried again at once
  on connections of its own with a long timeout (``RedisState.patient``); only if that
  fails too is the breaker tripped. Every call is safe to repeat: an admission's answer
  is kept under its lease id (``admit.lua``), a settle charges once per response or
  request id (``settle.lua``'s marker), the rest are reads and plain writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import StateError, StateTimeout
from ..quotas import Admission, QuotaScope, Windows
from . import Binding, LedgerEntry, Settled, StateBackend
from .redis import OPEN_BATCHES, binding_key, settle_tenant, tenant_key

log = logging.getLogger("gateway.state")
T = TypeVar("T")


class StateSkipped(StateError):
    """The breaker is open: the call was not attempted."""


Op = Callable[[StateBackend], Awaitable[T]]


class _Queued:
    __slots__ = ("key", "op", "shard", "what")

    def __init__(self, what: str, op: Op[Any], key: str | None, shard: str) -> None:
        self.what = what
        self.op = op
        self.key = key
        self.shard = shard


class GuardedState:
    """Wraps a shared ``StateBackend`` with per-node breakers, a retry queue, local bindings."""

    def __init__(
        self,
        inner: StateBackend,
        *,
        breaker_seconds: float = 5.0,
        queue_size: int = 10_000,
        on_event: Callable[[str, str], None] | None = None,
        shard_of: Callable[[str], str] | None = None,
    ) -> None:
        self.inner = inner
        self._lag: Callable[[], float] = lambda: 0.0
        # The same store with a long timeout, for calls whose answer the loop read late.
        patient = getattr(inner, "patient", None)
        self._patient: Callable[[], StateBackend] | None = patient
        self._timeout: float = getattr(inner, "timeout", 0.0)
        self.breaker_seconds = breaker_seconds
        self.queue_size = queue_size
        self._on_event = on_event
        self._shard_of = shard_of or (lambda key: "redis")
        self._open: dict[str, float] = {}  # node -> skipped until (monotonic)
        self._probing: set[str] = set()
        self._queue: deque[_Queued] = deque()
        self._local: OrderedDict[str, tuple[Binding, float]] = OrderedDict()
        self._drainer: asyncio.Task[None] | None = None

    # -- breaker ------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether any node is being skipped."""
        return bool(self._open)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _event(self, kind: str, operation: str) -> None:
        if self._on_event is not None:
            self._on_event(kind, operation)

    def watch_loop(self, lag: Callable[[], float]) -> None:
        """Where the event loop's measured lag (seconds) is read."""
        self._lag = lag

    def _late(self, elapsed: float) -> bool:
        """Whether a timeout may be the event loop's lateness rather than the store's."""
        if self._patient is None or not self._timeout:
            return False
        return elapsed > self._timeout * 1.25 or self._lag() > self._timeout * 0.25

    async def _attempt(self, what: str, op: Op[T]) -> T:
        started = time.monotonic()
        try:
            return await op(self.inner)
        except StateTimeout:
            if not self._late(time.monotonic() - started):
                raise
            assert self._patient is not None
        result = await op(self._patient())  # raises if the store is silent after all
        self._event("late", what)
        return result

    async def _call(self, what: str, op: Op[T], shard: str) -> T:
        probe = False
        until = self._open.get(shard)
        if until is not None:
            if time.monotonic() < until or shard in self._probing:
                self._event("skipped", what)
                raise StateSkipped(f"The gateway's state store is unavailable ({what}; skipped).")
            self._probing.add(shard)
            probe = True
        try:
            result = await self._attempt(what, op)
        except StateError as exc:
            if shard not in self._open:
                reason = repr(exc.__cause__)[:300]
                log.error(
                    "state store failed; skipping it",
                    extra={"operation": what, "node": shard, "reason": reason},
                )
            self._open[shard] = time.monotonic() + self.breaker_seconds
            self._event("tripped", what)
            raise
        finally:
            if probe:
                self._probing.discard(shard)
        if shard in self._open:
            del self._open[shard]
            self._event("closed", what)
            log.warning(
                "state store is back",
                extra={"operation": what, "node": shard, "queued": self.queued},
            )
        return result

    def _enqueue(self, item: _Queued) -> None:
        if len(self._queue) >= self.queue_size:
            dropped = self._queue.popleft()
            if dropped.key is not None:
                self._local.pop(dropped.key, None)
            self._event("dropped", dropped.what)
        self._queue.append(item)
        self._event("queued", item.what)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Write the queued operations, in order per node, as each node answers again."""
        while self._queue:
            for item in list(self._queue):
                until = self._open.get(item.shard)
                if until is not None and time.monotonic() < until:
                    continue  # that node is still skipped; the others go on
                try:
                    await self._call(item.what, item.op, item.shard)
                except StateError:
                    continue
                self._queue.remove(item)
                self._event("retried", item.what)
                if item.key is not None:
                    self._local.pop(item.key, None)
            if self._queue:
                now = time.monotonic()
                wake = min(self._open.values(), default=now + 0.05)
                await asyncio.sleep(max(0.05, wake - now))

    # -- the backend interface ------------------------------------------------

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        async def op(state: StateBackend) -> None:
            await state.bind_response(response_id, binding, ttl)

        shard = self._shard_of(binding_key(response_id))
        try:
            await self._call("bind", op, shard)
        except StateError:
            self._local[response_id] = (binding, time.monotonic() + ttl)
            self._enqueue(_Queued("bind", op, response_id, shard))

    async def get_binding(self, response_id: str) -> Binding | None:
        local = self._local.get(response_id)
        if local is not None and local[1] > time.monotonic():
            return local[0]
        shard = self._shard_of(binding_key(response_id))
        return await self._call("lookup", lambda state: state.get_binding(response_id), shard)

    async def delete_binding(self, response_id: str) -> None:
        self._local.pop(response_id, None)

        async def op(state: StateBackend) -> None:
            await state.delete_binding(response_id)

        shard = self._shard_of(binding_key(response_id))
        try:
            await self._call("unbind", op, shard)
        except StateError:
            self._enqueue(_Queued("unbind", op, None, shard))

    async def admit(
        self, scopes: list[QuotaScope], lease: str, lease_ttl: float, w: Windows
    ) -> Admission:
        shard = self._shard_of(tenant_key(scopes[0].tenant)) if scopes else "redis"
        return await self._call(
            "admit", lambda state: state.admit(scopes, lease, lease_ttl, w), shard
        )

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
        async def op(state: StateBackend) -> Settled:
            return await state.settle(scopes, lease, tokens, w, once, ttl, cost, ledger)

        shard = self._shard_of(tenant_key(settle_tenant(scopes, ledger)))
        try:
            return await self._call("settle", op, shard)
        except StateError:
            self._enqueue(_Queued("settle", op, None, shard))
            return Settled(False)

    async def charged(self, tenant: str, once: str) -> bool:
        shard = self._shard_of(tenant_key(tenant))
        return await self._call("charged", lambda state: state.charged(tenant, once), shard)

    async def batch_open(self, batch_id: str) -> None:
        shard = self._shard_of(OPEN_BATCHES)
        await self._call("batches", lambda state: state.batch_open(batch_id), shard)

    async def batch_done(self, batch_id: str) -> None:
        shard = self._shard_of(OPEN_BATCHES)
        await self._call("batches", lambda state: state.batch_done(batch_id), shard)

    async def open_batches(self) -> list[str]:
        shard = self._shard_of(OPEN_BATCHES)
        return await self._call("batches", lambda state: state.open_batches(), shard)

    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        shard = self._shard_of(OPEN_BATCHES)
        return await self._call("lease", lambda state: state.lease(name, holder, ttl), shard)

    async def connect(self) -> None:
        """Connect the inner backend early, if it can; a failure is left to the breaker."""
        connect = getattr(self.inner, "connect", None)
        if connect is None:
            return
        try:
            await connect()
        except StateError as exc:
            log.error("state store unreachable at start", extra={"reason": exc.message})

    async def usage(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        shard = self._shard_of(tenant_key(tenant))
        return await self._call("usage", lambda state: state.usage(tenant, day), shard)

    async def ping(self) -> None:
        """Raise while any node is skipped; else ping (a failed ping trips no breaker)."""
        now = time.monotonic()
        skipped = [node for node, until in self._open.items() if until > now]
        if skipped:
            raise StateSkipped(
                f"The gateway's state store is unavailable (skipping {', '.join(skipped)})."
            )
        await self.inner.ping()
        for node in [node for node, until in self._open.items() if until <= now]:
            del self._open[node]  # every node answered the ping
            self._event("closed", "ping")

    async def aclose(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self._queue:
            log.warning("state writes lost at shutdown", extra={"queued": len(self._queue)})
        await self.inner.aclose()
