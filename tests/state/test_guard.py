"""The state guard: breaker, probe, retry queue and local bindings (a fake backend)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import StateError
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
