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
