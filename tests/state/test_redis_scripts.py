"""The Redis scripts are safe to repeat: the guard tries a call again when its answer was
read late (``state/guard.py``), so an admission or a settle applied twice counts once."""

from __future__ import annotations

import asyncio

from harness import RedisServer

from gateway.quotas import QuotaScope, windows
from gateway.state import LedgerEntry
from gateway.state.redis import RedisState


def test_admit_and_settle_twice_count_once(redis_server: RedisServer) -> None:
    redis_server.flush()

    async def main() -> None:
        state = RedisState(redis_server.url)
        try:
            scopes = [QuotaScope("idem", "", 3, 0, 0, 0, 2)]
            w = windows()
            first = await state.admit(scopes, "req-1", 300, w)
            again = await state.admit(scopes, "req-1", 300, w)
            assert first == again and first.allowed
            assert first.remaining_requests == 2  # one request counted, not two
            other = await state.admit(scopes, "req-2", 300, windows())
            assert other.allowed and other.remaining_requests == 1
            ledger = LedgerEntry("idem", "m", "r", 5, 0, 7, 0, 0, False, 86400)
            done = await state.settle(scopes, "req-1", 12, w, "rq:req-1", 120, 0, ledger)
            twice = await state.settle(scopes, "req-1", 12, w, "rq:req-1", 120, 0, ledger)
            assert done.charged and not twice.charged
            rows = await state.usage("idem", w.day)
            assert rows[("m", "r")]["requests"] == 1 and rows[("m", "r")]["input_tokens"] == 5
            # The lease of req-1 is given back once, and req-2 still holds one slot.
            assert (await state.admit(scopes, "req-3", 300, windows())).allowed
        finally:
            await state.aclose()

    asyncio.run(main())
