"""Circuit breakers per upstream target (resource, deployment), shared across replicas.

Two ways to open one:
- a 429 that carries ``retry-after-ms`` / ``retry-after`` opens it at once for exactly
  that long, capped at ``max_retry_after_seconds`` (Azure's can be a day long); a 429
  for Azure's capacity (not the deployment's rate limit) does too, but when every
  target is open that way the answer is 503, not the caller's 429;
- otherwise ``failures`` failures (connect error, timeout, 5xx, a 429 without
  Retry-After) within ``window_seconds`` open it for ``open_seconds``.

While open, the target is skipped without a round trip. When the open time is over,
the next request that would use it is the probe (half-open; one at a time per
replica): success closes it, failure opens it again.

Shared: with a ``BreakerStore`` (Redis), a trip is published (one key per target, TTL
= open time) and every replica refreshes its view at most once a second in the
background, so no request pays a round trip for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from .config import BreakerConfig

log = logging.getLogger("gateway.breaker")

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
FAILURE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class BreakerStore(Protocol):
    """Where trips are shared: ``publish`` one, ``fetch`` all that are open."""

    async def publish(self, target: str, until: float, throttled: bool) -> None: ...

    async def fetch(self, targets: list[str]) -> dict[str, tuple[float, bool]]: ...


_CAPACITY = (b"temporarily unable to process", b"high demand", b"capacity", b"overloaded")


def capacity_429(body: bytes) -> bool:
    """Whether a 429 is Azure's own capacity running short, not the deployment's rate limit.

    Azure documents both under 429: "Requests to … have been limited" / "Rate limit is
    exceeded" (the allocation) versus "The service is temporarily unable to process your
    request" / "System is experiencing high demand" (shared capacity).
    """
    text = body[:4096].lower()
    return any(phrase in text for phrase in _CAPACITY)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Azure's ``retry-after-ms`` (preferred) or ``retry-after`` (seconds), if present."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue
            if seconds >= 0:
                return seconds
    return None


class _Target:
    __slots__ = ("failures", "open_until", "probing", "throttled")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.open_until = 0.0  # wall clock (shared between replicas)
        self.probing = False
        self.throttled = False


class Breakers:
    """The breakers of every target of this replica (and, with a store, of all replicas)."""

    def __init__(
        self,
        cfg: BreakerConfig,
        store: BreakerStore | None = None,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._on_event = on_event
        self._targets: dict[str, _Target] = {}
        self._publishing: set[asyncio.Task[None]] = set()

    def _get(self, key: str) -> _Target:
        state = self._targets.get(key)
        if state is None:
            state = self._targets[key] = _Target()
        return state

    def _event(self, kind: str, key: str) -> None:
        if self._on_event is not None:
            self._on_event(kind, key)

    def state(self, key: str, now: float | None = None) -> int:
        """CLOSED, HALF_OPEN (open time over, waiting for or running its probe) or OPEN."""
        t = self._targets.get(key)
        if t is None or not t.open_until:
            return CLOSED
        return OPEN if (now or time.time()) < t.open_until else HALF_OPEN

    def acquire(self, key: str) -> bool:
        """Whether a request may use ``key`` now; taking the probe when half-open."""
        t = self._targets.get(key)
        if t is None or not t.open_until:
            return True
        if time.time() < t.open_until or t.probing:
            return False
        t.probing = True
        self._event("probe", key)
        return True

    def release(self, key: str) -> None:
        """The request that acquired ``key`` is not sending to it after all."""
        t = self._targets.get(key)
        if t is not None:
            t.probing = False

    def reopens_at(self, keys: Iterable[str]) -> tuple[float, bool]:
        """The earliest re-open among ``keys``, and whether all of them were throttled."""
        states = [self._get(k) for k in keys]
        return min(t.open_until for t in states), all(t.throttled for t in states)

    def success(self, key: str) -> None:
        t = self._targets.get(key)
        if t is None:
            return
        if t.open_until:
            log.warning("target closed", extra={"target": key})
            self._event("closed", key)
        t.open_until = 0.0
        t.probing = False
        t.failures.clear()

    def failure(
        self, key: str, status: int | None, retry_after: float | None, capacity: bool = False
    ) -> None:
        """A connect error or timeout (``status`` None), or an upstream status >= 400.

        ``capacity``: a 429 for Azure's capacity, not the rate limit (see ``capacity_429``);
        it opens the breaker the same way but does not count as the caller's throttling.
        """
        if status is not None and status not in FAILURE_STATUS:
            self.success(key)  # the target answered; a client error is not its fault
            return
        t = self._get(key)
        now = time.time()
        cfg = self.cfg
        if status == 429 and retry_after is not None:
            until = now + min(retry_after, cfg.max_retry_after_seconds)
            self._open(key, t, until, not capacity)
            return
        t.failures.append(now)
        while t.failures and t.failures[0] < now - cfg.window_seconds:
            t.failures.popleft()
        if t.probing or len(t.failures) >= cfg.failures:
            self._open(key, t, now + cfg.open_seconds, status == 429 and not capacity)
        else:
            t.probing = False

    def _open(self, key: str, t: _Target, until: float, throttled: bool) -> None:
        t.open_until = max(until, time.time() + 0.001)
        t.throttled = throttled
        t.probing = False
        t.failures.clear()
        log.warning(
            "target opened",
            extra={"target": key, "seconds": round(until - time.time(), 3), "throttled": throttled},
        )
        self._event("trip", key)
        if self.store is not None:
            task = asyncio.get_running_loop().create_task(self._publish(key, until, throttled))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _publish(self, key: str, until: float, throttled: bool) -> None:
        assert self.store is not None
        try:
            await self.store.publish(key, until, throttled)
        except Exception as exc:  # sharing is best effort; this replica already skips it
            log.warning("could not share a breaker trip", extra={"reason": type(exc).__name__})

    def merge(self, shared: dict[str, tuple[float, bool]]) -> None:
        """Take trips other replicas published (a later re-open wins)."""
        for key, (until, throttled) in shared.items():
            t = self._get(key)
            if until > t.open_until and until > time.time():
                if not t.open_until:
                    self._event("trip_shared", key)
                t.open_until = until
                t.throttled = throttled
                t.probing = False

    async def refresh_forever(self, keys: Callable[[], list[str]], every: float = 1.0) -> None:
        """Pull the shared view every ``every`` seconds (owned by the app's lifespan)."""
        assert self.store is not None
        while True:
            try:
                self.merge(await self.store.fetch(keys()))
            except Exception as exc:
                log.debug("breaker refresh failed", extra={"reason": type(exc).__name__})
            await asyncio.sleep(every)

    async def aclose(self) -> None:
        for task in list(self._publishing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
