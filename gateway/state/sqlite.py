"""The embedded durable backend, the default: one process, one SQLite file (Python's own
``sqlite3``).

The quota engine is the memory backend's (``MemoryState``), in this process; what a
restart must not forget is also written down and read back at start:

- object bindings (who owns each id, where it lives): durable *before* the call returns,
  so before the client sees the id (``Answer.work`` awaits the bind before the bytes that
  carry it go on, on streams too). A bind is a JSON line stored into a memory-mapped log
  (``PATH-log``, ``_Log``), on the loop: the page cache holds it, so a killed process
  loses none, and no device is waited for. Every FOLD_SECONDS the log is sealed and
  folded into the SQLite file on the thread; a log a kill left is folded at start;
- runtime keys, their rotation graces and revocations (``SqliteKeyStore``): committed on
  the thread before the admin API answers; last-used times within a second;
- day and month token and money counters, the usage ledger and charge-once markers:
  added up in memory and stored into the log as one record every FLUSH_SECONDS (0.1 s),
  so a budget cannot be reset by a restart and a kill loses at most that tenth of a second;
- open batches (the watcher charges them after a restart).

Request-rate and token-per-minute buckets and concurrency leases stay in memory: they
may restart with the process.

One thread owns the SQLite connection (WAL, ``synchronous=NORMAL``): every transaction,
SQLite's checkpoints and their fsync, the log's folding, reads of bindings evicted from
the cache. Why bindings are not written through it: handing each bind to a thread and
back costs ~100 µs of CPU on a 2-core VM (two cross-thread wake-ups) and a commit in a
busy process ~150 µs, where a stored line costs a few µs (docs/benchmarks.md). One
process per file (an exclusive lock): several would each keep their own quota engine;
use Redis for more than one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import mmap
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import StateError
from ..quotas import QuotaScope, Windows, windows
from . import LEDGER_FIELDS, Binding, LedgerEntry, Settled, ledger_increments
from .keystore import ApiKey, MemoryKeyStore
from .memory import MemoryState, add_to_windows

log = logging.getLogger("gateway.state")

FLUSH_SECONDS = 0.1  # spend, ledger, markers, last-used: committed this often
FOLD_SECONDS = 10.0  # the log is folded into the file this often (or when it is full)
PRUNE_SECONDS = 600.0  # expired rows and surplus markers are dropped this often

_SCHEMA = (
    # ``charged``: the expiry of the object's charge-once marker (None: not charged yet).
    "CREATE TABLE IF NOT EXISTS bindings (id TEXT PRIMARY KEY, tenant TEXT, resource TEXT,"
    " model TEXT, kind TEXT, expires REAL, charged REAL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS counters (tenant TEXT, model TEXT, window TEXT,"
    " value INTEGER, PRIMARY KEY (tenant, model, window)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS ledger (tenant TEXT, day TEXT, model TEXT, resource TEXT,"
    f" {', '.join(f'{f} INTEGER' for f in LEDGER_FIELDS)},"
    " PRIMARY KEY (tenant, day, model, resource)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS charged (once TEXT PRIMARY KEY, expires REAL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS charged_expires ON charged (expires)",
    "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, record TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS key_used (id TEXT PRIMARY KEY, at REAL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS folded (log TEXT PRIMARY KEY, at REAL) WITHOUT ROWID",
)


def _columns(n: int) -> str:
    return ", ".join(f"value ->> {i}" for i in range(n))


# Many rows in one statement: the rows go in as one JSON array that SQLite unpacks
# (json_each), so a flush is one step per table. executemany steps once per row, and
# every step lets go of the GIL and takes it back: on a busy event loop each take-back is
# a thread switch (measured: the flushes cost the loop ~150 µs of CPU per request).
# An id bound again keeps the charge marker an earlier fold put on its row.
_BULK_BIND = (
    f"INSERT INTO bindings SELECT {_columns(7)} FROM json_each(?) WHERE true"
    " ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, resource = excluded.resource,"
    " model = excluded.model, kind = excluded.kind, expires = excluded.expires,"
    " charged = coalesce(excluded.charged, bindings.charged)"
)
_BULK_UNBIND = "DELETE FROM bindings WHERE id IN (SELECT value FROM json_each(?))"
_BULK_COUNTERS = (
    f"INSERT INTO counters SELECT {_columns(4)} FROM json_each(?) WHERE true"
    " ON CONFLICT (tenant, model, window) DO UPDATE SET value = value + excluded.value"
)
_BULK_LEDGER = (
    f"INSERT INTO ledger SELECT {_columns(4 + len(LEDGER_FIELDS))} FROM json_each(?) WHERE true"
    " ON CONFLICT (tenant, day, model, resource) DO UPDATE SET "
    + ", ".join(f"{f} = {f} + excluded.{f}" for f in LEDGER_FIELDS)
)
_BULK_CHARGED = f"INSERT OR REPLACE INTO charged SELECT {_columns(2)} FROM json_each(?)"
_BULK_USED = f"INSERT OR REPLACE INTO key_used SELECT {_columns(2)} FROM json_each(?)"
_BULK = {_BULK_BIND, _BULK_UNBIND, _BULK_COUNTERS, _BULK_LEDGER, _BULK_CHARGED, _BULK_USED}
Statement = tuple[str, tuple[Any, ...]]
# One statement and its rows: a _BULK_ one takes them all as one JSON array, any other
# runs once per row.
Batch = tuple[str, list[Any]]


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit never waits for the device
    db.execute("PRAGMA journal_size_limit=67108864")  # the log shrinks back after a reset
    return db


def _exclusive(path: str) -> int:
    """Hold an exclusive lock on ``path``.lock for this process (released when it closes the
    descriptor or dies): one gateway per state file, since each keeps its own quota engine."""
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(f"The state file {path} cannot be opened: {exc}.") from exc
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


class _Pending:
    """Additive writes nobody waits for (spend, ledger, markers, last used), added up."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str, str], int] = {}
        self.ledger: dict[tuple[str, str, str, str], list[int]] = {}
        self.charged: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def additive(self) -> bool:
        return bool(self.counters or self.ledger or self.charged or self.used)

    def rows(self) -> list[list[Any]]:
        """The writes as rows: counters, ledger, markers, last used (an ``a`` record's
        body, and the rows of the bulk statements)."""
        return [
            [[*k, v] for k, v in self.counters.items()],
            [[*k, *v] for k, v in self.ledger.items()],
            [[*item] for item in self.charged.items()],
            [[*item] for item in self.used.items()],
        ]

    def merge(self, rows: list[list[Any]]) -> None:
        """Add the rows of an ``a`` record (``rows()``'s shape) to these."""
        counters, ledger, charged, used = rows
        for tenant, model, window, value in counters:
            key = (tenant, model, window)
            self.counters[key] = self.counters.get(key, 0) + value
        for tenant, day, model, resource, *values in ledger:
            totals = self.ledger.setdefault((tenant, day, model, resource), [0] * len(values))
            for n, value in enumerate(values):
                totals[n] += value
        for once, expires in charged:
            self.charged[once] = expires
        for key_id, at in used:
            self.used[key_id] = max(at, self.used.get(key_id, 0.0))

    def statements(self) -> list[Batch]:
        """Every pending write, as (sql, rows)."""
        sqls = (_BULK_COUNTERS, _BULK_LEDGER, _BULK_CHARGED, _BULK_USED)
        return [(sql, rows) for sql, rows in zip(sqls, self.rows(), strict=True) if rows]


class SqliteState(MemoryState):
    """``MemoryState`` whose bindings, spend, ledger, markers, batches and keys survive a
    restart (``state.backend: sqlite``)."""

    # A settle never suspends here either (its writes are added up for the next flush), so
    # the lifecycle awaits it directly, as for the memory backend.
    local = True

    def __init__(self, path: str, max_bindings: int = 250_000) -> None:
        super().__init__(max_bindings)
        self.path = path
        self.keys = SqliteKeyStore(self)
        self._lock: int | None = None
        self._log = _Log(path)
        self._pending = _Pending()
        self._flush_later: asyncio.TimerHandle | None = None
        self._fold_later: asyncio.TimerHandle | None = None
        # One thread owns the SQLite connection: the load, every write, the log's folding,
        # checkpoints (SQLite's own, on this connection) and reads of evicted bindings.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self._folding: asyncio.Future[None] | None = None
        self._prune_at = 0.0  # the first fold prunes
        self._open = False

    def key_store(self) -> SqliteKeyStore:
        return self.keys

    async def _on_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # -- opening and closing ---------------------------------------------------------

    async def connect(self) -> None:
        """Open the file and read back what it holds (the app's lifespan calls this)."""
        self._lock = _exclusive(self.path)
        try:
            rows = await self._on_thread(self._open_and_load)
            self._log.open()
        except (sqlite3.Error, OSError, StateError) as exc:
            self._release()
            message = exc.message if isinstance(exc, StateError) else str(exc)
            raise StateError(f"The state file {self.path} cannot be opened: {message}.") from exc
        now, mono = time.time(), time.monotonic()
        for oid, tenant, resource, model, kind, expires in rows["bindings"]:
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
        self._open = True
        self._fold_later = asyncio.get_running_loop().call_later(FOLD_SECONDS, self._fold_soon)

    def _open_and_load(self) -> dict[str, list[Any]]:
        """On the thread: the connection, the schema, the binding log folded into the file
        (a kill may have left it), then what the file holds."""
        db = self._db = _connect(self.path)
        for statement in _SCHEMA:
            db.execute(statement)
        self._log.fold_into(db, current=True)
        return _load(db, self._max)

    async def aclose(self) -> None:
        if not self._open:
            self._thread.shutdown(wait=True)
            self._release()
            return
        self._open = False
        for handle in (self._flush_later, self._fold_later):
            if handle is not None:
                handle.cancel()
        self._flush_later = self._fold_later = None
        if self._folding is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._folding)
        self._store_pending()  # one last record: what is added up
        self._log.close()
        if self._db is not None:
            with contextlib.suppress(StateError, sqlite3.Error, OSError):
                await self._on_thread(self._close_on_thread)
        self._thread.shutdown(wait=True)
        self._release()

    def _close_on_thread(self) -> None:
        db = self._db
        assert db is not None
        try:
            self._log.fold_into(db, current=True)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
            self._db = None

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    # -- writing: the binding log on the loop, the rest on the thread -----------------

    async def _write(self, *statements: Statement) -> None:
        """Commit ``statements`` on the thread and return once they are in the file: keys
        and batches, a few a minute."""
        if not self._open:
            raise StateError("The state file is not open.")
        batches: list[Batch] = [(sql, [params]) for sql, params in statements]
        error = await self._on_thread(_run_or_error, self._db, batches)
        if error is not None:
            raise error

    def _later(self) -> None:
        """The additive writes (spend, ledger, markers, last used) go into the log within
        FLUSH_SECONDS, as one record."""
        if self._flush_later is None and self._open:
            loop = asyncio.get_running_loop()
            self._flush_later = loop.call_later(FLUSH_SECONDS, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_later = None
        if self._open:
            self._store_pending()

    def _store_pending(self) -> None:
        """The added-up spend, ledger, markers and last-used times: one log record."""
        pending = self._pending
        if not pending.additive():
            return
        try:
            self._log.append(["a", *pending.rows()])
        except OSError as exc:
            log.error("state.flush_failed", extra={"error": str(exc)})
            self._later()  # kept: tried again
            return
        self._pending = _Pending()

    def _fold_soon(self) -> None:
        """Every FOLD_SECONDS the binding log is sealed and folded into the file on the
        thread (a fresh log takes the new bindings meanwhile)."""
        self._fold_later = None
        if not self._open:
            return
        loop = asyncio.get_running_loop()
        self._store_pending()  # what is added up goes into the log being sealed
        if self._folding is None and self._log.written:
            try:
                self._log.seal()
            except OSError as exc:
                log.error("state.log_seal_failed", extra={"error": str(exc)})
            else:
                self._folding = loop.run_in_executor(self._thread, self._fold)
                self._folding.add_done_callback(self._folded)
        self._fold_later = loop.call_later(FOLD_SECONDS, self._fold_soon)

    def _fold(self) -> None:
        assert self._db is not None
        self._log.fold_into(self._db)
        if time.monotonic() >= self._prune_at:
            self._prune_at = time.monotonic() + PRUNE_SECONDS
            _prune(self._db, self._max)

    def _folded(self, f: asyncio.Future[None]) -> None:
        self._folding = None
        if not f.cancelled() and f.exception() is not None:
            # The sealed log stays on disk: folded at the next try or the next start.
            log.error("state.fold_failed", extra={"error": repr(f.exception())})
        else:
            self._log.forget_sealed()

    # -- the backend interface --------------------------------------------------------

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        """In the cache and appended to the binding log (one ``write`` to the page cache)
        before it returns: durable across a killed process before the client sees the id."""
        await super().bind_response(response_id, binding, ttl)
        if not self._open:
            raise StateError("The state file is not open.")
        try:
            self._log.bind(response_id, binding, time.time() + ttl)
        except OSError as exc:
            raise StateError(f"The state log could not be written: {exc}.") from exc

    async def get_binding(self, response_id: str) -> Binding | None:
        found = await super().get_binding(response_id)
        if found is not None or len(self._bindings) < self._max or not self._open:
            return found
        # Evicted from the cache (it holds ``memory_max_objects``): the log or the file knows.
        known, logged = self._log.lookup(response_id)
        if known:
            row: Any = logged
        else:
            try:
                row = await self._on_thread(_binding, self._db, response_id)
            except sqlite3.Error as exc:
                raise StateError(f"The state file could not be read: {exc}.") from exc
        if row is None or row[4] <= time.time():
            return None
        binding = Binding(*row[:4])
        await super().bind_response(response_id, binding, row[4] - time.time())
        return binding

    async def delete_binding(self, response_id: str) -> None:
        await super().delete_binding(response_id)
        if not self._open:
            raise StateError("The state file is not open.")
        try:
            self._log.forget(response_id)
        except OSError as exc:
            raise StateError(f"The state log could not be written: {exc}.") from exc

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
        pending = self._pending
        counters = pending.counters
        for s in scopes:
            add_to_windows(counters, s, w, tokens, cost)
        if ledger is not None:
            fields = ledger_increments(ledger)
            row = pending.ledger.setdefault(
                (ledger.tenant, w.day, ledger.model, ledger.resource), [0] * len(LEDGER_FIELDS)
            )
            for i, name in enumerate(LEDGER_FIELDS):
                row[i] += fields[name]
        if once is not None and not once.startswith("rq:"):
            # A request's own marker (``rq:``) guards a settle tried again within that
            # request: after a restart there is no such request, so it is not written.
            pending.charged[once] = w.now + ttl
        self._later()
        return settled

    async def batch_open(self, batch_id: str) -> None:
        await super().batch_open(batch_id)
        await self._write(("INSERT OR IGNORE INTO batches VALUES (?)", (batch_id,)))

    async def batch_done(self, batch_id: str) -> None:
        await super().batch_done(batch_id)
        await self._write(("DELETE FROM batches WHERE id = ?", (batch_id,)))

    async def ping(self) -> None:
        if not self._open:
            raise StateError("The state file is not open.")

    def remember_used(self, used: dict[str, float]) -> None:
        """Last-used times of keys, written with the next flush."""
        pending = self._pending.used
        for key_id, at in used.items():
            pending[key_id] = max(at, pending.get(key_id, 0.0))
        self._later()


def _run(db: sqlite3.Connection | None, statements: list[Batch]) -> None:
    """One transaction, on the thread."""
    if not statements:
        return
    if db is None:
        raise StateError("The state file is not open.")
    try:
        db.execute("BEGIN IMMEDIATE")
        for sql, rows in statements:
            if sql in _BULK:
                if rows:
                    db.execute(sql, (json.dumps(rows),))
            else:
                db.executemany(sql, rows)
        db.execute("COMMIT")
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _run_or_error(db: sqlite3.Connection | None, statements: list[Batch]) -> StateError | None:
    try:
        _run(db, statements)
    except StateError as exc:
        return exc
    except sqlite3.Error as exc:
        return StateError(f"The state file could not be written: {exc}.")
    return None


class _Log:
    """What the loop writes down without waiting: bindings (``b``), deletes (``d``) and,
    every FLUSH_SECONDS, the added-up spend, ledger, markers and last-used times (``a``),
    as JSON lines stored into a memory-mapped, preallocated file. A store is a memory copy
    (no system call); the kernel's page cache holds it, so a killed process loses none.
    Every FOLD_SECONDS, or when the file is full, it is sealed (renamed ``PATH-log.N``) and
    a fresh one mapped; the thread folds sealed logs into the SQLite file in order. Logs a
    kill left are folded at the next start. ``recent`` and ``sealed`` answer for bindings
    evicted from the cache before their fold (loop side only)."""

    SIZE = 8 * 1024 * 1024

    def __init__(self, path: str) -> None:
        self.path = path + "-log"
        self.seq = 0
        self.fd: int | None = None
        self.map: mmap.mmap | None = None
        self.pos = 0
        self.written = False
        self.recent: dict[str, tuple[Any, ...] | None] = {}
        self.sealed: dict[str, tuple[Any, ...] | None] = {}

    def open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, self.SIZE)  # blocks reserved: no SIGBUS when full
            else:  # pragma: no cover - not Linux
                os.ftruncate(fd, self.SIZE)
            self.map = mmap.mmap(fd, self.SIZE)
        except OSError:
            os.close(fd)
            raise
        self.fd, self.pos, self.written = fd, 0, False
        # Each log's name for the fold (``folded``), so a reader from outside counts a log
        # either from the file or from the table, never both.
        self.append(["h", uuid.uuid4().hex])
        self.written = False

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def append(self, record: list[Any]) -> None:
        data = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if self.map is None:
            raise OSError("the state log is not open")
        if self.pos + len(data) > self.SIZE:
            self.seal()
            assert self.map is not None
            if len(data) > self.SIZE:
                raise OSError("a state log record larger than the log")
        self.map[self.pos : self.pos + len(data)] = data
        self.pos += len(data)
        self.written = True

    def bind(self, oid: str, binding: Binding, expires: float) -> None:
        self.append(["b", oid, *binding, expires])
        self.recent[oid] = (*binding, expires)

    def forget(self, oid: str) -> None:
        self.append(["d", oid])
        self.recent[oid] = None

    def lookup(self, oid: str) -> tuple[bool, tuple[Any, ...] | None]:
        for index in (self.recent, self.sealed):
            if oid in index:
                return True, index[oid]
        return False, None

    def seal(self) -> None:
        """Rename the log for folding and map a fresh one (on the loop: metadata only)."""
        self.close()
        while os.path.exists(f"{self.path}.{self.seq}"):
            self.seq += 1
        os.rename(self.path, f"{self.path}.{self.seq}")
        self.seq += 1
        self.open()
        self.sealed, self.recent = {**self.sealed, **self.recent}, {}

    def forget_sealed(self) -> None:
        if not self._sealed_paths():
            self.sealed = {}

    def _sealed_paths(self) -> list[str]:
        folder, name = os.path.split(self.path)
        found = []
        for entry in os.listdir(folder or "."):
            head, _, seq = entry.rpartition(".")
            if head == name and seq.isdigit():
                found.append((int(seq), os.path.join(folder, entry)))
        return [p for _, p in sorted(found)]

    def fold_into(self, db: sqlite3.Connection, current: bool = False) -> None:
        """On the thread: the sealed logs (with ``current``, the live one too: at start and
        at close, when nothing writes it) into the SQLite file, in order, one transaction
        each, then removed."""
        paths = self._sealed_paths() + ([self.path] if current else [])
        for path in paths:
            if os.path.exists(path):
                _fold_file(db, path)
                os.unlink(path)


def _records(data: bytes) -> Iterator[list[Any]]:
    """The whole records of a log's bytes, in order (up to the preallocated zeros; a record
    cut by a kill mid-store, only ever the last, is skipped)."""
    end = data.find(b"\0")
    for line in (data if end < 0 else data[:end]).split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, list) and record:
            yield record


def _fold_file(db: sqlite3.Connection, path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    binds: dict[str, list[Any] | None] = {}
    pending = _Pending()
    name: list[str] = []
    for record in _records(data):
        kind = record[0]
        if kind == "h" and len(record) == 2:
            name.append(record[1])
        elif kind == "b" and len(record) == 7:
            binds[record[1]] = [*record[1:], None]
        elif kind == "d" and len(record) == 2:
            binds[record[1]] = None
        elif kind == "a" and len(record) == 5:
            pending.merge(record[1:])
    for once, expires in list(pending.charged.items()):
        bound = binds.get(once)
        if bound is not None:
            bound[6] = expires  # the marker rides on its object's row
            del pending.charged[once]
    # In key order: the inserts walk the table's pages once, in order.
    rows = sorted((row for row in binds.values() if row is not None), key=lambda r: r[0])
    gone = sorted(oid for oid, row in binds.items() if row is None)
    folded: list[Batch] = [
        ("INSERT OR IGNORE INTO folded VALUES (?, ?)", [(n, time.time()) for n in name])
    ]
    _run(db, [(_BULK_BIND, rows), (_BULK_UNBIND, gone), *pending.statements(), *folded])


def _prune(db: sqlite3.Connection, keep: int) -> None:
    """Drop expired bindings and markers, and all but the newest ``keep`` markers (the
    memory backend keeps as many): the file does not grow with every response forever."""
    now = time.time()
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM bindings WHERE expires <= ?", (now,))
    db.execute("DELETE FROM charged WHERE expires <= ?", (now,))
    db.execute(
        "DELETE FROM charged WHERE once IN (SELECT once FROM charged"
        " ORDER BY expires DESC, once DESC LIMIT -1 OFFSET ?)",
        (keep,),
    )
    db.execute("DELETE FROM folded WHERE at < ?", (now - 86400,))
    db.execute("COMMIT")


def _outcome(future: asyncio.Future[StateError | None]) -> StateError | None:
    """What a commit on the writer thread came to (an unexpected exception included)."""
    if future.cancelled():
        return StateError("The state file write was cancelled.")
    exc = future.exception()
    if exc is not None:
        return StateError(f"The state file could not be written: {exc!r}.")
    return future.result()


def _load(db: sqlite3.Connection, keep: int) -> dict[str, list[Any]]:
    """Everything the file holds that is still alive (expired rows are dropped first)."""
    now = time.time()
    w = windows(now)
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM bindings WHERE expires <= ?", (now,))
    db.execute("DELETE FROM charged WHERE expires <= ?", (now,))
    current = (w.day, w.month, "$" + w.day, "$" + w.month)
    db.execute("DELETE FROM counters WHERE window NOT IN (?, ?, ?, ?)", current)
    db.execute("COMMIT")
    out: dict[str, list[Any]] = {}
    for table in ("counters", "ledger", "batches", "keys", "key_used", "meta"):
        out[table] = db.execute(f"SELECT * FROM {table}").fetchall()
    # The newest ``keep`` bindings and markers: what the memory cache holds (oldest first).
    out["bindings"] = db.execute(
        "SELECT id, tenant, resource, model, kind, expires FROM bindings"
        " ORDER BY expires DESC LIMIT ?",
        (keep,),
    ).fetchall()[::-1]
    out["charged"] = db.execute(
        "SELECT once, expires FROM (SELECT once, expires FROM charged UNION ALL"
        " SELECT id, charged FROM bindings WHERE charged IS NOT NULL)"
        " ORDER BY expires DESC LIMIT ?",
        (keep,),
    ).fetchall()[::-1]
    return out


def _binding(db: sqlite3.Connection, oid: str) -> Any:
    return db.execute(
        "SELECT tenant, resource, model, kind, expires FROM bindings WHERE id = ?", (oid,)
    ).fetchone()


class SqliteKeyStore(MemoryKeyStore):
    """Runtime keys in memory (this replica's view) and in the state file."""

    def __init__(self, state: SqliteState) -> None:
        super().__init__()
        self.state = state

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
        await self.state._write(
            ("INSERT OR REPLACE INTO keys VALUES (?, ?)", (key.id, key.to_json())),
            ("INSERT OR REPLACE INTO meta VALUES ('keys_version', ?)", (self._version,)),
        )

    async def delete(self, key: ApiKey) -> None:
        await super().delete(key)
        await self.state._write(
            ("DELETE FROM keys WHERE id = ?", (key.id,)),
            ("DELETE FROM key_used WHERE id = ?", (key.id,)),
            ("INSERT OR REPLACE INTO meta VALUES ('keys_version', ?)", (self._version,)),
        )

    async def touch(self, used: dict[str, float]) -> None:
        await super().touch(used)
        self.state.remember_used({k: self.used[k] for k in used})


class LedgerFile:
    """The usage ledger of a state file, read from outside the gateway that writes it
    (``gateway usage``): the logs not yet folded, then a read-only snapshot of the file
    (WAL), beside the running gateway. A log folded in between is in the snapshot's
    ``folded`` table and counted from there only."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def usage(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        return await asyncio.to_thread(self._read, tenant, day)

    def _logs(self) -> list[tuple[str, list[list[Any]]]]:
        """(log name, its ledger rows) of every log beside the file, read now."""
        folder, base = os.path.split(self.path + "-log")
        out: list[tuple[str, list[list[Any]]]] = []
        for _ in range(3):  # a log sealed (renamed) between listing and reading: again
            names = sorted(e for e in os.listdir(folder or ".") if e.startswith(base))
            out, missed = [], False
            for entry in names:
                try:
                    with open(os.path.join(folder, entry), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    missed = True
                    break
                out.append(_ledger_of(data))
            if not missed:
                break
        return out

    def _read(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        if not os.path.exists(self.path):
            raise StateError(f"There is no state file at {self.path} (state.path).")
        logs = self._logs()
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None)
            try:
                db.execute("BEGIN")  # one snapshot for both reads
                rows = db.execute(
                    "SELECT * FROM ledger WHERE tenant = ? AND day = ?", (tenant, day)
                ).fetchall()
                folded = {name for (name,) in db.execute("SELECT log FROM folded")}
                db.execute("COMMIT")
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StateError(f"The state file {self.path} cannot be read: {exc}.") from exc
        out = {
            (model, resource): dict(zip(LEDGER_FIELDS, values, strict=True))
            for _, _, model, resource, *values in rows
        }
        for name, ledger in logs:
            if name in folded:
                continue
            for row in ledger:
                if row[0] != tenant or row[1] != day:
                    continue
                fields = out.setdefault((row[2], row[3]), dict.fromkeys(LEDGER_FIELDS, 0))
                for field, value in zip(LEDGER_FIELDS, row[4:], strict=True):
                    fields[field] += value
        return out


def _ledger_of(data: bytes) -> tuple[str, list[list[Any]]]:
    """A log's name and the ledger rows of its ``a`` records."""
    name, rows = "", []
    for record in _records(data):
        if record[0] == "h" and len(record) == 2:
            name = record[1]
        elif record[0] == "a" and len(record) == 5:
            rows.extend(record[2])
    return name, rows
