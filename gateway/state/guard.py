"""A shared state backend (Redis) behind a circuit breaker, with retries of what must land.

- **Breaker**: a timeout or connection error opens it for ``breaker_seconds``; while
  open, calls fail at once with ``StateSkipped`` (no round trip), so a black-holed
  Redis costs one timeout per interval, not one per request. When the interval is
  over, one call is the probe (others keep skipping until it answers): success
  closes the breaker, failure opens it again.
- **What must land is retried**: a settle (lease release + token charge) or a binding
  that fails is queued (at most ``queue_size`` entries; beyond that the oldest is
  dropped and counted) and written by a drainer task once the breaker closes, in
  order. A binding waiting in the queue is also kept on this replica and answered
  from there, so a response created during an outage is never a 404 here.
- A retried settle may charge twice if Redis applied the first attempt but its
  answer was lost; the charge-once marker prevents this for background responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import StateError
from ..quotas import Admission, QuotaScope, Windows
from . import Binding, StateBackend

log = logging.getLogger("gateway.state")
T = TypeVar("T")


class StateSkipped(StateError):
    """The breaker is open: the call was not attempted."""


class GuardedState:
    """Wraps a shared ``StateBackend`` with a breaker, a retry queue and local bindings."""

    def __init__(
        self,
        inner: StateBackend,
        *,
        breaker_seconds: float = 5.0,
        queue_size: int = 10_000,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.breaker_seconds = breaker_seconds
        self.queue_size = queue_size
        self._on_event = on_event
        self.open_until = 0.0
        self._probing = False
        self._queue: deque[tuple[str, Callable[[], Awaitable[Any]], str | None]] = deque()
        self._local: OrderedDict[str, tuple[Binding, float]] = OrderedDict()
        self._drainer: asyncio.Task[None] | None = None

    # -- breaker ------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.open_until > 0.0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _event(self, kind: str, operation: str) -> None:
        if self._on_event is not None:
            self._on_event(kind, operation)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        probe = False
        if self.open_until:
            if time.monotonic() < self.open_until or self._probing:
                self._event("skipped", what)
                raise StateSkipped(f"The gateway's state store is unavailable ({what}; skipped).")
            self._probing = probe = True
        try:
            result = await op()
        except StateError:
            if not self.open_until:
                log.error("state store failed; skipping it", extra={"operation": what})
            self.open_until = time.monotonic() + self.breaker_seconds
            self._event("tripped", what)
            raise
        finally:
            if probe:
                self._probing = False
        if self.open_until:
            self.open_until = 0.0
            self._event("closed", what)
            log.warning("state store is back", extra={"operation": what, "queued": self.queued})
        return result

    def _enqueue(self, what: str, op: Callable[[], Awaitable[Any]], key: str | None) -> None:
        if len(self._queue) >= self.queue_size:
            _, _, dropped = self._queue.popleft()
            if dropped is not None:
                self._local.pop(dropped, None)
            self._event("dropped", what)
        self._queue.append((what, op, key))
        self._event("queued", what)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Write the queued operations in order, while the breaker stays closed."""
        while self._queue:
            what, op, key = self._queue[0]
            try:
                await self._call(what, op)
            except StateError:
                await asyncio.sleep(max(0.05, self.open_until - time.monotonic()))
                continue
            self._queue.popleft()
            self._event("retried", what)
            if key is not None:
                self._local.pop(key, None)

    # -- the backend interface ------------------------------------------------

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        async def op() -> None:
            await self.inner.bind_response(response_id, binding, ttl)

        try:
            await self._call("bind", op)
        except StateError:
            self._local[response_id] = (binding, time.monotonic() + ttl)
            self._enqueue("bind", op, response_id)

    async def get_binding(self, response_id: str) -> Binding | None:
        local = self._local.get(response_id)
        if local is not None and local[1] > time.monotonic():
            return local[0]
        return await self._call("lookup", lambda: self.inner.get_binding(response_id))

    async def delete_binding(self, response_id: str) -> None:
        self._local.pop(response_id, None)

        async def op() -> None:
            await self.inner.delete_binding(response_id)

        try:
            await self._call("unbind", op)
        except StateError:
            self._enqueue("unbind", op, None)

    async def admit(
        self, scopes: list[QuotaScope], lease: str, lease_ttl: float, w: Windows
    ) -> Admission:
        return await self._call("admit", lambda: self.inner.admit(scopes, lease, lease_ttl, w))

    async def settle(
        self,
        scopes: list[QuotaScope],
        lease: str | None,
        tokens: int,
        w: Windows,
        once: str | None,
        ttl: float,
    ) -> bool:
        async def op() -> bool:
            return await self.inner.settle(scopes, lease, tokens, w, once, ttl)

        try:
            return await self._call("settle", op)
        except StateError:
            self._enqueue("settle", op, None)
            return False

    async def ping(self) -> None:
        if self.open_until and time.monotonic() < self.open_until:
            raise StateSkipped("The gateway's state store is unavailable (breaker open).")
        await self._call("ping", self.inner.ping)

    async def aclose(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self._queue:
            log.warning("state writes lost at shutdown", extra={"queued": len(self._queue)})
        await self.inner.aclose()
