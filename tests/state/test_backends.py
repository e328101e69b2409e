"""One behavioural suite for every state backend: memory, the embedded file (sqlite), one
Redis. Each scenario runs on each; the durable ones also keep what they hold when a second
instance opens the same store (a restart)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.quotas import QuotaScope, windows
from gateway.state import Binding, LedgerEntry, StateBackend
from gateway.state.memory import MemoryState

Factory = Callable[[], StateBackend]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    if request.param == "memory":
        return lambda: MemoryState(1000)
    if request.param == "sqlite":
        from gateway.state.sqlite import SqliteState

        return lambda: SqliteState(str(tmp_path / "state.db"), 1000)
    from gateway.state.redis import RedisState

    server = request.getfixturevalue("redis_server")
    server.flush()
    return lambda: RedisState(server.url, timeout=2.0)


def run(make: Factory, scenario: Callable[[StateBackend], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        state = make()
        connect = getattr(state, "connect", None)
        if connect is not None:
            await connect()
        try:
            return await scenario(state)
        finally:
            await state.aclose()

    return asyncio.run(main())


def test_bindings_bind_read_expire_and_delete(make: Factory) -> None:
    async def scenario(state: StateBackend) -> None:
        kept = Binding("team-a", "swc", "gpt-4.1", "response")
        await state.bind_response("resp_kept", kept, 3600)
        await state.bind_response("file_short", Binding("team-b", "frc", "", "file"), 1)
        assert await state.get_binding("resp_kept") == kept
        assert await state.get_binding("resp_unknown") is None
        await state.bind_response("resp_gone", kept, 3600)
        await state.delete_binding("resp_gone")
        assert await state.get_binding("resp_gone") is None
        await asyncio.sleep(1.1)
        assert await state.get_binding("file_short") is None
        assert await state.get_binding("resp_kept") == kept

    run(make, scenario)


def test_requests_per_minute_and_concurrency_are_exact(make: Factory) -> None:
    async def scenario(state: StateBackend) -> None:
        rate = QuotaScope("rate", "", 3, 0, 0, 0, 0)
        w = windows()
        got = [(await state.admit([rate], f"r{n}", 60, w)) for n in range(4)]
        assert [a.allowed for a in got] == [True, True, True, False]
        assert got[3].reason == "requests_per_minute" and got[3].retry_after > 0
        assert [a.remaining_requests for a in got[:3]] == [2, 1, 0]
        # Concurrency: two leases; a settle gives one back.
        two = QuotaScope("conc", "", 0, 0, 0, 0, 2)
        assert (await state.admit([two], "c1", 60, w)).allowed
        assert (await state.admit([two], "c2", 60, w)).allowed
        third = await state.admit([two], "c3", 60, w)
        assert not third.allowed and third.reason == "max_concurrent_requests"
        await state.settle([two], "c1", 0, w, None, 60)
        assert (await state.admit([two], "c4", 60, w)).allowed
        # Every scope must pass: the refusing one is named by its index.
        refused = await state.admit([two, rate], "c5", 60, w)
        assert not refused.allowed and refused.scope in (0, 1)

    run(make, scenario)


def test_settle_charges_once_and_the_ledger_adds_up(make: Factory) -> None:
    async def scenario(state: StateBackend) -> None:
        scope = QuotaScope("spend", "", 0, 0, 0, 0, 0, 5_000, 0)  # 0.005 a day
        w = windows()
        entry = LedgerEntry("spend", "gpt-4.1", "swc", 10, 2, 5, 1, 3_000, False, 86400)
        first = await state.settle([scope], None, 15, w, "resp_1", 3600, 3_000, entry)
        again = await state.settle([scope], None, 15, w, "resp_1", 3600, 3_000, entry)
        assert first.charged and not again.charged
        assert first.spent == ((3_000, 3_000),)
        assert await state.charged("spend", "resp_1")
        assert not await state.charged("spend", "resp_2")
        assert (await state.admit([scope], "a1", 60, w)).allowed
        second = await state.settle([scope], None, 15, w, "resp_2", 3600, 3_000, entry)
        assert second.spent == ((6_000, 6_000),)
        refused = await state.admit([scope], "a2", 60, w)
        assert not refused.allowed and refused.reason == "budget_per_day"
        rows = await state.usage("spend", w.day)
        row = rows[("gpt-4.1", "swc")]
        assert row["requests"] == 2 and row["input_tokens"] == 20 and row["cost_micro"] == 6_000
        assert row["cached_tokens"] == 4 and row["reasoning_tokens"] == 2
        assert await state.usage("other", w.day) == {}

    run(make, scenario)


def test_tokens_per_day_refuse_once_spent(make: Factory) -> None:
    async def scenario(state: StateBackend) -> None:
        scope = QuotaScope("daily", "gpt-4.1", 0, 0, 100, 0, 0)
        w = windows()
        assert (await state.admit([scope], "a", 60, w)).allowed
        await state.settle([scope], None, 100, w, None, 60)
        refused = await state.admit([scope], "b", 60, w)
        assert not refused.allowed and refused.reason == "tokens_per_day"
        assert 0 < refused.retry_after <= 86400

    run(make, scenario)


def test_open_batches_until_done(make: Factory) -> None:
    async def scenario(state: StateBackend) -> None:
        for bid in ("batch_1", "batch_2", "batch_1"):
            await state.batch_open(bid)
        assert sorted(await state.open_batches()) == ["batch_1", "batch_2"]
        await state.batch_done("batch_1")
        await state.batch_done("batch_unknown")
        assert await state.open_batches() == ["batch_2"]
        assert await state.lease("watcher", "me", 30)

    run(make, scenario)


def test_what_a_durable_backend_holds_survives_reopening(make: Factory) -> None:
    """A second instance on the same store (a restart) owns the same ids, remembers the
    day's spend and charge markers, the ledger and the open batches."""
    forgets = type(make()) is MemoryState  # by design: it warns at start and in /readyz
    scope = QuotaScope("kept", "", 0, 0, 0, 0, 0, 1_000, 0)
    entry = LedgerEntry("kept", "gpt-4.1", "swc", 1, 0, 1, 0, 1_000, False, 86400)
    binding = Binding("kept", "swc", "gpt-4.1", "response")

    async def before(state: StateBackend) -> str:
        w = windows()
        await state.bind_response("resp_kept", binding, 3600)
        await state.settle([scope], None, 2, w, "resp_kept", 3600, 1_000, entry)
        await state.batch_open("batch_kept")
        return w.day

    async def after(state: StateBackend) -> None:
        w = windows()
        if forgets:
            assert await state.get_binding("resp_kept") is None
            assert await state.open_batches() == []
            return
        assert await state.get_binding("resp_kept") == binding
        assert await state.charged("kept", "resp_kept")
        again = await state.settle([scope], None, 2, w, "resp_kept", 3600, 1_000, entry)
        assert not again.charged
        refused = await state.admit([scope], "a", 60, w)
        assert not refused.allowed and refused.reason == "budget_per_day"
        assert (await state.usage("kept", day))[("gpt-4.1", "swc")]["requests"] == 1
        assert await state.open_batches() == ["batch_kept"]

    day = run(make, before)
    run(make, after)
