"""The in-memory state backend."""

from __future__ import annotations

import asyncio

from gateway.state import Binding
from gateway.state.memory import MemoryState


def test_bindings_expire_and_are_bounded() -> None:
    async def scenario() -> None:
        state = MemoryState(max_bindings=2)
        await state.bind_response("r1", Binding("a", "swc"), ttl=0.05)
        assert await state.get_binding("r1") == Binding("a", "swc")
        await asyncio.sleep(0.06)
        assert await state.get_binding("r1") is None
        for rid in ("r2", "r3", "r4"):
            await state.bind_response(rid, Binding("a", "swc"), ttl=60)
        assert await state.get_binding("r2") is None  # oldest evicted
        assert await state.get_binding("r4") is not None
        await state.delete_binding("r4")
        assert await state.get_binding("r4") is None

    asyncio.run(scenario())


def test_charge_markers_and_old_windows_are_pruned() -> None:
    from gateway.quotas import QuotaScope, windows

    async def scenario() -> None:
        state = MemoryState(max_bindings=100)
        scope = QuotaScope("a", "", 0, 0, 1000, 0, 0)
        day1 = windows(1_700_000_000)
        for n in range(250):  # markers are capped like bindings
            assert (await state.settle([scope], None, 1, day1, f"resp_{n}", 3600)).charged
        assert len(state._charged) <= 100
        again = await state.settle([scope], None, 1, day1, "resp_249", 3600)
        assert not again.charged  # once
        day2 = windows(1_700_000_000 + 86400 * 40)
        await state.settle([scope], None, 1, day2, None, 3600)
        assert {k[2] for k in state._counters} == {
            day2.day,
            day2.month,
            "$" + day2.day,
            "$" + day2.month,
        }
        later = windows(1_700_000_000 + 7200)  # past the markers' ttl: all pruned
        await state.settle([scope], None, 1, later, "fresh", 3600)
        assert list(state._charged) == ["fresh"]

    asyncio.run(scenario())
