"""The embedded durable backend: what a restart must keep survives a kill -9 of the
process (bindings and keys as soon as their call returned; spend, ledger and charge
markers within a second), and it admits and settles like the memory backend."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from gateway.quotas import QuotaScope, windows
from gateway.state import Binding
from gateway.state.sqlite import SqliteState

# A budget of 1 EUR a day (millionths), 60 requests a minute.
SCOPE = QuotaScope("team-a", "", 60, 0, 0, 0, 0, 1_000_000, 0)

CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from gateway.quotas import QuotaScope, windows
    from gateway.state import Binding, LedgerEntry
    from gateway.state.keystore import ApiKey
    from gateway.state.sqlite import SqliteState

    SCOPE = QuotaScope("team-a", "", 60, 0, 0, 0, 0, 1_000_000, 0)

    async def main() -> None:
        state = SqliteState(sys.argv[1])
        await state.connect()
        keys = state.key_store()
        hashes = (("new", None), ("old", time.time() + 3600))
        key = ApiKey("key_1", "team-a", "ci", 1.0, None, hashes)
        await keys.put(key)
        await keys.put(ApiKey("key_2", "team-a", "gone", 1.0, None, (("h2", None),)))
        await keys.delete(await keys.get("key_2"))
        await keys.touch({"key_1": 1234.0})
        for n in range(200):
            binding = Binding("team-a", "swc", "gpt-4.1", "response")
            await state.bind_response(f"resp_{n:024d}", binding, 3600)
            w = windows()
            await state.admit([SCOPE], f"rq{n}", 60, w)
            ledger = LedgerEntry("team-a", "gpt-4.1", "swc", 10, 0, 5, 0, 1000, False, 86400)
            await state.settle([SCOPE], None, 15, w, f"resp_{n:024d}", 3600, 1000, ledger)
        await state.batch_open("batch_1")
        print("settled", flush=True)
        await asyncio.sleep(3600)  # killed here, never closed

    asyncio.run(main())
    """
)


def test_a_killed_process_forgets_nothing_it_promised(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "settled"
    time.sleep(1.0)  # settles are committed within milliseconds; the promise is a second
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()

    async def main() -> None:
        state = SqliteState(path)
        await state.connect()
        try:
            for n in (0, 199):
                got = await state.get_binding(f"resp_{n:024d}")
                assert got == Binding("team-a", "swc", "gpt-4.1", "response")
            assert await state.get_binding("resp_" + "9" * 24) is None
            w = windows()
            rows = await state.usage("team-a", w.day)
            assert rows[("gpt-4.1", "swc")]["requests"] == 200
            assert rows[("gpt-4.1", "swc")]["input_tokens"] == 2000
            # The day's spend is as it was: 200 x 1000 millionths of the 1 EUR budget.
            settled = await state.settle([SCOPE], None, 0, w, "resp_x", 60, 1000, None)
            assert settled.spent == ((201_000, 201_000),)
            # Charged once, across the restart.
            again = await state.settle([SCOPE], None, 15, w, f"resp_{0:024d}", 3600, 1000, None)
            assert not again.charged
            assert await state.open_batches() == ["batch_1"]
            keys = state.key_store()
            key = await keys.get("key_1")
            assert key is not None and key.usable(time.time()) == ("new", "old")  # grace kept
            assert await keys.get("key_2") is None and await keys.by_hash("h2") is None
            assert (await keys.last_used())["key_1"] == 1234.0
            assert await keys.version() == 3
        finally:
            await state.aclose()

    asyncio.run(main())


def test_a_graceful_close_flushes_and_a_spent_budget_stays_spent(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")

    async def first() -> None:
        state = SqliteState(path)
        await state.connect()
        w = windows()
        assert (await state.admit([SCOPE], "a", 60, w)).allowed
        await state.settle([SCOPE], "a", 10, w, "rq:a", 120, 1_000_000)  # the whole budget
        assert not (await state.admit([SCOPE], "b", 60, w)).allowed
        await state.aclose()

    async def second() -> None:
        state = SqliteState(path)
        await state.connect()
        try:
            refused = await state.admit([SCOPE], "c", 60, windows())
            assert not refused.allowed and refused.reason == "budget_per_day"
        finally:
            await state.aclose()

    asyncio.run(first())
    asyncio.run(second())


def test_bindings_past_the_cache_are_read_from_the_file(tmp_path: Path) -> None:
    async def main() -> None:
        state = SqliteState(str(tmp_path / "state.db"), max_bindings=10)
        await state.connect()
        try:
            for n in range(30):
                await state.bind_response(f"file-{n:020d}", Binding("t", "r", "", "file"), 60)
            assert len(state._bindings) <= 10
            assert await state.get_binding(f"file-{0:020d}") == Binding("t", "r", "", "file")
            await state.delete_binding(f"file-{1:020d}")
            assert await state.get_binding(f"file-{1:020d}") is None
        finally:
            await state.aclose()

    asyncio.run(main())


def test_an_unwritable_file_is_a_state_error(tmp_path: Path) -> None:
    from gateway.errors import StateError

    async def main() -> None:
        state = SqliteState(str(tmp_path))  # a directory
        try:
            await state.connect()
        except StateError as exc:
            assert "cannot be opened" in exc.message
        else:
            raise AssertionError("a directory opened as a state file")

    asyncio.run(main())


def test_a_second_process_on_the_same_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Two gateways on one file would each keep their own quota engine: the second is
    refused at start, saying what to do; the file is free again once the first closes."""
    import pytest

    from gateway.errors import StateError

    path = str(tmp_path / "state.db")

    async def main() -> None:
        first = SqliteState(path)
        await first.connect()
        try:
            with pytest.raises(StateError, match=r"one replica.*state\.backend: redis"):
                await SqliteState(path).connect()
        finally:
            await first.aclose()
        again = SqliteState(path)
        await again.connect()
        await again.aclose()

    asyncio.run(main())


def test_markers_are_capped_and_request_markers_not_written(tmp_path: Path) -> None:
    """The file keeps as many charge markers as the memory backend (the newest), none of a
    request's own (``rq:``: no request outlives a restart), and no expired binding."""
    import sqlite3

    from gateway.state import sqlite as module

    path = str(tmp_path / "state.db")

    async def main() -> None:
        state = SqliteState(path, max_bindings=50)
        await state.connect()
        try:
            w = windows()
            for n in range(120):
                await state.settle([SCOPE], None, 1, w, f"resp_{n:03d}", 3600)
                await state.settle([SCOPE], None, 1, w, f"rq:{n:03d}", 60)
            await state.bind_response("resp_short", Binding("a", "r", "", "response"), 0.05)
            await asyncio.sleep(0.2)  # flushed
            state._log.seal()
            await asyncio.get_running_loop().run_in_executor(state._thread, state._fold)
        finally:
            await state.aclose()

    asyncio.run(main())
    db = sqlite3.connect(path)
    marks = [row[0] for row in db.execute("SELECT once FROM charged ORDER BY once")]
    assert not any(m.startswith("rq:") for m in marks)
    assert len(marks) == 50 and marks[0] == "resp_070" and marks[-1] == "resp_119"
    assert db.execute("SELECT count(*) FROM bindings").fetchone() == (0,)
    assert module.FLUSH_SECONDS <= 0.1


def test_a_record_cut_by_a_kill_is_skipped_and_the_rest_folded(tmp_path: Path) -> None:
    """A kill in the middle of storing a record leaves part of a line before the log's
    zeros: folding skips it and keeps every whole record before it."""
    import sqlite3

    from gateway.state.sqlite import _SCHEMA, _connect, _Log

    path = str(tmp_path / "state.db")
    log = _Log(path)
    log.open()
    for n in range(3):
        log.bind(f"resp_{n}", Binding("team-a", "swc", "m", "response"), time.time() + 60)
    assert log.map is not None
    half = b'["b","resp_cut","team-a","swc","m","resp'  # the start of a fourth record
    log.map[log.pos : log.pos + len(half)] = half
    log.close()
    db = _connect(path)
    for statement in _SCHEMA:
        db.execute(statement)
    log.fold_into(db, current=True)
    ids = [row[0] for row in db.execute("SELECT id FROM bindings ORDER BY id")]
    assert ids == ["resp_0", "resp_1", "resp_2"]
    assert not os.path.exists(log.path)  # folded, then removed
    db.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM bindings").fetchone() == (3,)


def test_the_ledger_read_from_outside_counts_each_log_once(tmp_path: Path) -> None:
    """`gateway usage` reads the logs not yet folded and the file: a log already folded
    but not yet removed (the fold commits, then unlinks) is counted from the file only."""
    import shutil

    from gateway.state import LedgerEntry
    from gateway.state.sqlite import LedgerFile

    path = str(tmp_path / "state.db")
    entry = LedgerEntry("team-a", "gpt-4.1", "swc", 10, 0, 5, 0, 1000, False, 86400)

    async def main() -> str:
        state = SqliteState(path)
        await state.connect()
        try:
            w = windows()
            await state.settle([SCOPE], None, 15, w, "resp_1", 3600, 1000, entry)
            await asyncio.sleep(0.25)  # in the log
            assert (await LedgerFile(path).usage("team-a", w.day))[("gpt-4.1", "swc")][
                "requests"
            ] == 1  # from the log: not folded yet
            state._log.seal()
            (sealed,) = state._log._sealed_paths()
            shutil.copy(sealed, str(tmp_path / "copy"))
            await asyncio.get_running_loop().run_in_executor(state._thread, state._fold)
            shutil.copy(str(tmp_path / "copy"), sealed)  # folded, but still there
            rows = await LedgerFile(path).usage("team-a", w.day)
            assert rows[("gpt-4.1", "swc")]["requests"] == 1
            await state.settle([SCOPE], None, 15, w, "resp_2", 3600, 1000, entry)
            await asyncio.sleep(0.25)
            rows = await LedgerFile(path).usage("team-a", w.day)
            assert rows[("gpt-4.1", "swc")]["requests"] == 2  # the file's and the live log's
            os.unlink(sealed)
            return w.day
        finally:
            await state.aclose()

    day = asyncio.run(main())
    rows = asyncio.run(LedgerFile(path).usage("team-a", day))
    assert rows[("gpt-4.1", "swc")]["requests"] == 2  # all folded at close


def test_an_id_bound_again_keeps_its_charge_marker(tmp_path: Path) -> None:
    """A response charged in one fold and bound again in a later one is still charged after
    a restart (the rebinding once replaced the row, marker and all)."""
    path = str(tmp_path / "state.db")
    binding = Binding("team-a", "swc", "gpt-4.1", "response")

    async def fold(state: SqliteState) -> None:
        state._store_pending()
        state._log.seal()
        await asyncio.get_running_loop().run_in_executor(state._thread, state._fold)

    async def first() -> None:
        state = SqliteState(path)
        await state.connect()
        try:
            await state.bind_response("resp_again", binding, 3600)
            await state.settle([SCOPE], None, 5, windows(), "resp_again", 3600, 10)
            await fold(state)
            await state.bind_response("resp_again", binding, 3600)
            await fold(state)
        finally:
            await state.aclose()

    async def second() -> None:
        state = SqliteState(path)
        await state.connect()
        try:
            assert await state.charged("team-a", "resp_again")
            again = await state.settle([SCOPE], None, 5, windows(), "resp_again", 3600, 10)
            assert not again.charged
        finally:
            await state.aclose()

    asyncio.run(first())
    asyncio.run(second())
