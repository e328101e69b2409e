"""The state guard: breaker, probe, retry queue and local bindings (a fake backend)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import StateError, StateTimeout
from gateway.quotas import Admission, windows
from gateway.state import Binding, Settled
from gateway.state.guard import GuardedState, StateSkipped
from gateway.state.memory import MemoryState


class Flaky(MemoryState):
    """A memory backend that fails every call while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    async def _gate(self) -> None:
        self.calls += 1
        if self.down:
            raise StateError("down")

    async def admit(self, *a: Any) -> Admission:
        await self._gate()
        return await super().admit(*a)

    async def settle(self, *a: Any) -> Settled:
        await self._gate()
        return await super().settle(*a)

    async def bind_response(self, *a: Any) -> None:
        await self._gate()
        await super().bind_response(*a)

    async def get_binding(self, rid: str) -> Binding | None:
        await self._gate()
        return await super().get_binding(rid)


def test_breaker_skips_then_probes_then_drains() -> None:
    async def scenario() -> None:
        inner = Flaky()
        events: list[tuple[str, str]] = []
        guard = GuardedState(
            inner, breaker_seconds=0.2, queue_size=10, on_event=lambda *e: events.append(e)
        )
        inner.down = True
        with pytest.raises(StateError):
            await guard.admit([], "l1", 1, windows())
        calls = inner.calls
        for _ in range(5):  # open: no round trips
            with pytest.raises(StateSkipped):
                await guard.admit([], "l1", 1, windows())
        assert inner.calls == calls and guard.is_open
        await guard.bind_response("r1", Binding("a", "swc"), 60)  # kept here, queued
        assert await guard.get_binding("r1") == Binding("a", "swc")
        assert (await guard.settle([], "l1", 5, windows(), None, 60)).charged is False
        assert guard.queued == 2
        inner.down = False
        await asyncio.sleep(0.5)  # the drainer probes once the interval is over
        assert guard.queued == 0 and not guard.is_open
        assert await inner.get_binding("r1") == Binding("a", "swc")
        kinds = [e[0] for e in events]
        assert kinds.count("tripped") == 1 and "closed" in kinds and kinds.count("retried") == 2
        await guard.aclose()

    asyncio.run(scenario())


def test_queue_is_bounded_and_counts_drops() -> None:
    async def scenario() -> None:
        inner = Flaky()
        events: list[tuple[str, str]] = []
        guard = GuardedState(
            inner, breaker_seconds=60, queue_size=3, on_event=lambda *e: events.append(e)
        )
        inner.down = True
        for n in range(5):
            await guard.bind_response(f"r{n}", Binding("a", "swc"), 60)
        assert guard.queued == 3
        assert [e[0] for e in events].count("dropped") == 2
        assert await guard.get_binding("r4") is not None
        with pytest.raises(StateSkipped):
            await guard.get_binding("r0")  # dropped from here, and Redis is skipped
        await guard.aclose()

    asyncio.run(scenario())


def test_only_one_probe_at_a_time() -> None:
    async def scenario() -> None:
        inner = Flaky()
        guard = GuardedState(inner, breaker_seconds=0.05)
        inner.down = True
        with pytest.raises(StateError):
            await guard.admit([], "l", 1, windows())
        await asyncio.sleep(0.1)
        release = asyncio.Event()
        original = inner.admit

        async def slow(*a: Any) -> Admission:
            await release.wait()
            return await original(*a)

        inner.admit = slow  # type: ignore[method-assign]
        inner.down = False
        probe = asyncio.ensure_future(guard.admit([], "l", 1, windows()))
        await asyncio.sleep(0.01)
        with pytest.raises(StateSkipped):  # the probe is in flight: others skip
            await guard.admit([], "l2", 1, windows())
        release.set()
        assert (await probe).allowed and not guard.is_open
        await guard.aclose()

    asyncio.run(scenario())


class Late(MemoryState):
    """Times out like a Redis whose answer was read ``took`` seconds late (``late``
    calls), or like a silent one (``silent``); its ``patient`` twin answers unless silent."""

    timeout = 0.2

    def __init__(self, took: float, silent: bool = False) -> None:
        super().__init__()
        self.took, self.silent = took, silent
        self.late = 1
        self.twin: Late | None = None

    def patient(self) -> Late:
        if self.twin is None:
            self.twin = Late(0.0, self.silent)
            self.twin.late = 1 if self.silent else 0
            self.twin._buckets = self._buckets  # one store, two connections
        return self.twin

    async def admit(self, *a: Any) -> Admission:
        if self.late:
            self.late -= 1
            await asyncio.sleep(self.took)
            raise StateTimeout("did not answer in time")
        return await super().admit(*a)


def _scopes() -> list[Any]:
    from gateway.quotas import QuotaScope

    return [QuotaScope("t", "", 10, 0, 0, 0, 0)]


def test_a_timeout_read_late_is_tried_again_not_tripped() -> None:
    events: list[tuple[str, str]] = []

    async def main() -> None:
        inner = Late(took=0.3)  # the answer came after 0.3 s: the loop was late
        g = GuardedState(inner, on_event=lambda k, w: events.append((k, w)))
        adm = await g.admit(_scopes(), "lease-1", 300, windows())
        assert adm.allowed and not g.is_open
        assert ("late", "admit") in events and not any(k == "tripped" for k, _ in events)

    asyncio.run(main())


def test_a_late_loop_by_its_measured_lag() -> None:
    async def main() -> None:
        g = GuardedState(Late(took=0.2))  # on time, but the loop's lag says it was late
        g.watch_loop(lambda: 0.12)
        assert (await g.admit(_scopes(), "lease-1", 300, windows())).allowed

    asyncio.run(main())


def test_a_silent_store_on_a_punctual_loop_trips_at_once() -> None:
    async def main() -> None:
        inner = Late(took=0.2)
        g = GuardedState(inner)
        with pytest.raises(StateTimeout):
            await g.admit(_scopes(), "lease-1", 300, windows())
        assert g.is_open and inner.twin is None  # no second try: nothing suggested lateness
        late_and_silent = Late(took=0.3, silent=True)
        g = GuardedState(late_and_silent)
        with pytest.raises(StateTimeout):
            await g.admit(_scopes(), "lease-1", 300, windows())
        assert g.is_open  # the patient try failed too: an outage after all

    asyncio.run(main())
