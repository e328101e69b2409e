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


def test_a_call_with_an_older_time_never_refills_twice(redis_server: RedisServer) -> None:
    """A retry carries the time of its first try, older than the bucket's last call: it
    must not move the bucket's clock back (the interval would refill twice). Seen as a
    27th admission where 26 were the most possible under a starved loop."""
    from gateway.state.memory import MemoryState

    redis_server.flush()

    async def main() -> None:
        for state in (RedisState(redis_server.url), MemoryState(1000)):
            try:
                scopes = [QuotaScope("clock", "", 60, 0, 0, 0, 0)]  # one request a second
                w = windows()
                w = w._replace(now=float(int(w.now)))  # whole seconds: exact differences
                later = w._replace(now=w.now + 10)
                admitted = 0
                for n in range(59):  # one request left in the bucket at t+10
                    admitted += (await state.admit(scopes, f"a{n}", 300, later)).allowed
                assert admitted == 59
                # A late call stamped t takes the last one; the clock stays at t+10.
                assert (await state.admit(scopes, "old", 300, w)).allowed
                # At t+12.5 two and a half requests' worth has refilled, not twelve.
                at = w._replace(now=w.now + 12.5)
                got = [(await state.admit(scopes, f"b{n}", 300, at)).allowed for n in range(5)]
                assert got == [True, True, False, False, False], (state, got)
            finally:
                await state.aclose()

    asyncio.run(main())
