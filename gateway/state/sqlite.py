"""The embedded durable backend: one process, one SQLite file (Python's own ``sqlite3``).

The quota engine is the memory backend's (``MemoryState``), in this process; what a
restart must not forget is also written to the file, which is read back at start:

- object bindings (who owns each id, where it lives): durable *before* the call returns,
  so before the client sees the id (``Answer.work`` awaits the bind before the bytes that
  carry it go on, on streams too);
- runtime keys, their rotation graces and revocations (``SqliteKeyStore``): durable
  before the admin API answers; last-used times within about a second;
- day and month token and money counters, the usage ledger and charge-once markers:
  written with each settle, committed within milliseconds (group commit), so a budget
  cannot be reset by a restart;
- open batches (the watcher charges them after a restart).

Request-rate and token-per-minute buckets and concurrency leases stay in memory: they
may restart with the process. The event loop never waits on disk: one writer thread owns
the connection (WAL, ``synchronous=NORMAL``: durable across a killed process) and commits
whatever has queued meanwhile in one transaction; callers that need durability await
their write's commit. One replica only: several processes on one file would each keep
their own quota engine (use Redis for more than one).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import StateError
from ..quotas import QuotaScope, Windows, windows
from . import LEDGER_FIELDS, Binding, LedgerEntry, Settled, ledger_increments
from .keystore import ApiKey, MemoryKeyStore
from .memory import MemoryState

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS bindings (id TEXT PRIMARY KEY, tenant TEXT, resource TEXT,"
    " model TEXT, kind TEXT, expires REAL)",
    "CREATE TABLE IF NOT EXISTS counters (tenant TEXT, model TEXT, window TEXT,"
    " value INTEGER, PRIMARY KEY (tenant, model, window))",
    "CREATE TABLE IF NOT EXISTS ledger (tenant TEXT, day TEXT, model TEXT, resource TEXT,"
    f" {', '.join(f'{f} INTEGER' for f in LEDGER_FIELDS)},"
    " PRIMARY KEY (tenant, day, model, resource))",
    "CREATE TABLE IF NOT EXISTS charged (once TEXT PRIMARY KEY, expires REAL)",
    "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, record TEXT)",
    "CREATE TABLE IF NOT EXISTS key_used (id TEXT PRIMARY KEY, at REAL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER)",
)
_LEDGER_ADD = (
    f"INSERT INTO ledger VALUES (?, ?, ?, ?, {', '.join('?' for _ in LEDGER_FIELDS)})"
    " ON CONFLICT (tenant, day, model, resource) DO UPDATE SET "
    + ", ".join(f"{f} = {f} + excluded.{f}" for f in LEDGER_FIELDS)
)
Statement = tuple[str, tuple[Any, ...]]


class _Writer:
    """One thread that owns the SQLite connection: writes are committed in groups (all that
    queued while the previous commit ran, in one transaction); reads run in order too."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: int | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = _exclusive(self.path)
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="sqlite-writer", daemon=True
        )
        self._thread.start()
        error = ready.get()
        if error is not None:
            self._unlock()
            raise StateError(f"The state file {self.path} cannot be opened: {error}.") from error

    def _run(self, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                db.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            ready.put(exc)
            return
        ready.put(None)
        while True:
            first = self._queue.get()
            if first is None:
                db.close()
                return
            group = [first]
            with contextlib.suppress(queue.Empty):
                while len(group) < 1000:
                    item = self._queue.get_nowait()
                    if item is None:
                        self._queue.put(None)  # stop after this group
                        break
                    group.append(item)
            self._commit(db, group)

    def _commit(self, db: sqlite3.Connection, group: list[Any]) -> None:
        results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]] = []
        try:
            db.execute("BEGIN")
            for work, future in group:
                value = None
                if callable(work):
                    value = work(db)
                else:
                    _apply(db, work)
                results.append((future, value, None))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            results = [(future, None, exc) for _, future in group]
        assert self._loop is not None
        for future, value, error in results:
            if future is not None:
                self._loop.call_soon_threadsafe(_resolve, future, value, error)

    def send(self, work: list[Statement] | Callable[[sqlite3.Connection], Any]) -> None:
        """Queue ``work`` (committed within milliseconds; nobody waits)."""
        self._queue.put((work, None))

    async def run(self, work: list[Statement] | Callable[[sqlite3.Connection], Any]) -> Any:
        """Queue ``work`` and wait for its commit (its result, for a read)."""
        assert self._loop is not None
        future = self._loop.create_future()
        self._queue.put((work, future))
        return await future

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)
            self._thread = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None


def _exclusive(path: str) -> int:
    """Hold an exclusive lock on ``path``.lock for this process (released when it closes the
    descriptor or dies): one gateway per state file, since each keeps its own quota engine."""
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(f"The state file {path} cannot be locked: {exc}.") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StateError(
            f"Another gateway process uses the state file {path}. The sqlite backend"
            " serves one replica; give each process its own state.path, or use"
            " state.backend: redis for several replicas."
        ) from None
    return fd


def _apply(db: sqlite3.Connection, statements: list[Statement]) -> None:
    for sql, params in statements:
        db.execute(sql, params)


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(StateError(f"The state file could not be written: {error}."))
    else:
        future.set_result(value)


class SqliteState(MemoryState):
    """``MemoryState`` whose bindings, spend, ledger, markers, batches and keys survive a
    restart (``state.backend: sqlite``)."""

    local = False  # a bind awaits its commit

    def __init__(self, path: str, max_bindings: int = 250_000) -> None:
        super().__init__(max_bindings)
        self.path = path
        self.writer = _Writer(path)
        self.keys = SqliteKeyStore(self.writer)

    def key_store(self) -> SqliteKeyStore:
        return self.keys

    async def connect(self) -> None:
        """Open the file and read back what it holds (the app's lifespan calls this)."""
        self.writer.start(asyncio.get_running_loop())
        now, mono = time.time(), time.monotonic()
        rows = await self.writer.run(_load)
        for oid, tenant, resource, model, kind, expires in rows["bindings"][-self._max :]:
            self._bindings[oid] = (Binding(tenant, resource, model, kind), mono + expires - now)
        for tenant, model, window, value in rows["counters"]:
            self._counters[(tenant, model, window)] = value
        for tenant, day, model, resource, *values in rows["ledger"]:
            day_rows = self._ledger.setdefault((tenant, day), {})
            day_rows[(model, resource)] = dict(zip(LEDGER_FIELDS, values, strict=True))
        for once, expires in rows["charged"]:
            self._charged[once] = expires
        for (bid,) in rows["batches"]:
            self._batches[bid] = None
        self.keys.load(rows)

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        await super().bind_response(response_id, binding, ttl)
        row = (response_id, *binding, time.time() + ttl)
        await self.writer.run([("INSERT OR REPLACE INTO bindings VALUES (?, ?, ?, ?, ?, ?)", row)])

    async def get_binding(self, response_id: str) -> Binding | None:
        found = await super().get_binding(response_id)
        if found is not None or len(self._bindings) < self._max:
            return found
        # Evicted from the cache (it holds ``memory_max_objects``): the file still knows.
        row = await self.writer.run(lambda db: _binding(db, response_id))
        if row is None or row[4] <= time.time():
            return None
        binding = Binding(*row[:4])
        await super().bind_response(response_id, binding, row[4] - time.time())
        return binding

    async def delete_binding(self, response_id: str) -> None:
        await super().delete_binding(response_id)
        await self.writer.run([("DELETE FROM bindings WHERE id = ?", (response_id,))])

    async def settle(
        self,
        scopes: list[QuotaScope],
        lease: str | None,
        tokens: int,
        w: Windows,
        once: str | None,
        ttl: float,
        cost: int = 0,
        ledger: LedgerEntry | None = None,
    ) -> Settled:
        settled = await super().settle(scopes, lease, tokens, w, once, ttl, cost, ledger)
        if not settled.charged:
            return settled
        statements: list[Statement] = []
        add = (
            "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT (tenant, model, window)"
            " DO UPDATE SET value = value + excluded.value"
        )
        for s in scopes:
            for window, amount in ((w.day, tokens), (w.month, tokens)):
                statements.append((add, (s.tenant, s.model, window, amount)))
            for window in (w.day, w.month):
                statements.append((add, (s.tenant, s.model, "$" + window, cost)))
        if ledger is not None:
            fields = ledger_increments(ledger)
            values = tuple(fields[f] for f in LEDGER_FIELDS)
            row = (ledger.tenant, w.day, ledger.model, ledger.resource, *values)
            statements.append((_LEDGER_ADD, row))
        if once is not None:
            statements.append(("INSERT OR REPLACE INTO charged VALUES (?, ?)", (once, w.now + ttl)))
        self.writer.send(statements)  # committed within milliseconds; nobody waits
        return settled

    async def batch_open(self, batch_id: str) -> None:
        await super().batch_open(batch_id)
        await self.writer.run([("INSERT OR IGNORE INTO batches VALUES (?)", (batch_id,))])

    async def batch_done(self, batch_id: str) -> None:
        await super().batch_done(batch_id)
        await self.writer.run([("DELETE FROM batches WHERE id = ?", (batch_id,))])

    async def ping(self) -> None:
        await self.writer.run(lambda db: db.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        await asyncio.to_thread(self.writer.stop)


def _load(db: sqlite3.Connection) -> dict[str, list[Any]]:
    """Everything the file holds that is still alive (expired rows are dropped first)."""
    now = time.time()
    w = windows(now)
    db.execute("DELETE FROM bindings WHERE expires <= ?", (now,))
    db.execute("DELETE FROM charged WHERE expires <= ?", (now,))
    current = (w.day, w.month, "$" + w.day, "$" + w.month)
    db.execute("DELETE FROM counters WHERE window NOT IN (?, ?, ?, ?)", current)
    out: dict[str, list[Any]] = {}
    for table, order in (
        ("bindings", "ORDER BY expires"),
        ("counters", ""),
        ("ledger", ""),
        ("charged", "ORDER BY expires"),
        ("batches", ""),
        ("keys", ""),
        ("key_used", ""),
        ("meta", ""),
    ):
        out[table] = db.execute(f"SELECT * FROM {table} {order}").fetchall()
    return out


def _binding(db: sqlite3.Connection, oid: str) -> Any:
    return db.execute(
        "SELECT tenant, resource, model, kind, expires FROM bindings WHERE id = ?", (oid,)
    ).fetchone()


class SqliteKeyStore(MemoryKeyStore):
    """Runtime keys in memory (this replica's view) and in the state file."""

    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self.writer = writer

    def load(self, rows: dict[str, list[Any]]) -> None:
        for _, record in rows["keys"]:
            key = ApiKey.from_json(record)
            self.keys[key.id] = key
            for h, _until in key.hashes:
                self.hashes[h] = key.id
        self.used = {key_id: at for key_id, at in rows["key_used"]}
        self._version = dict(rows["meta"]).get("keys_version", 0)

    async def put(self, key: ApiKey, dropped: tuple[str, ...] = ()) -> None:
        await super().put(key, dropped)
        await self.writer.run(
            [
                ("INSERT OR REPLACE INTO keys VALUES (?, ?)", (key.id, key.to_json())),
                ("INSERT OR REPLACE INTO meta VALUES ('keys_version', ?)", (self._version,)),
            ]
        )

    async def delete(self, key: ApiKey) -> None:
        await super().delete(key)
        await self.writer.run(
            [
                ("DELETE FROM keys WHERE id = ?", (key.id,)),
                ("DELETE FROM key_used WHERE id = ?", (key.id,)),
                ("INSERT OR REPLACE INTO meta VALUES ('keys_version', ?)", (self._version,)),
            ]
        )

    async def touch(self, used: dict[str, float]) -> None:
        await super().touch(used)
        self.writer.send(
            [("INSERT OR REPLACE INTO key_used VALUES (?, ?)", (k, self.used[k])) for k in used]
        )


class LedgerFile:
    """The usage ledger of a state file, read from outside the gateway that writes it
    (``gateway usage``): a read-only connection, beside the running gateway (WAL)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def usage(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        return await asyncio.to_thread(self._read, tenant, day)

    def _read(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        if not os.path.exists(self.path):
            raise StateError(f"There is no state file at {self.path} (state.path).")
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True)
            try:
                rows = db.execute(
                    "SELECT * FROM ledger WHERE tenant = ? AND day = ?", (tenant, day)
                ).fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StateError(f"The state file {self.path} cannot be read: {exc}.") from exc
        return {
            (model, resource): dict(zip(LEDGER_FIELDS, values, strict=True))
            for _, _, model, resource, *values in rows
        }
