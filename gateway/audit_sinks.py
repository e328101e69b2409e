"""Audit sinks: where hash-chained audit records go (file, stdout, Redis Stream).

Each sink keeps its own chain: a record's ``prev_hash`` is the ``hash`` of the record
written before it to that sink, and ``hash`` is the SHA-256 of the record's canonical
JSON (sorted keys, no spaces) without the ``hash`` field. ``write`` returns only once
the records are durable (file: written, flushed and fsynced); concurrent callers
share one fsync (group commit).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

GENESIS = "0" * 64


class AuditWriteError(Exception):
    """A sink could not make records durable."""


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(record: dict[str, Any], prev: str) -> tuple[dict[str, Any], str]:
    """``record`` with ``prev_hash`` and ``hash`` set; and its hash."""
    sealed = {**record, "prev_hash": prev}
    digest = hashlib.sha256(canonical(sealed)).hexdigest()
    sealed["hash"] = digest
    return sealed, digest


class Sink(Protocol):
    name: str

    async def write(self, records: list[dict[str, Any]]) -> None: ...

    async def aclose(self) -> None: ...


class _Chained(ABC):
    """Chaining and group commit shared by the sinks."""

    name = "sink"

    def __init__(self) -> None:
        self._last = GENESIS
        self._pending: list[bytes] = []
        self._enqueued = 0
        self._durable = 0
        self._lock = asyncio.Lock()

    def _encode(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            sealed, self._last = seal(record, self._last)
            line = json.dumps(sealed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            self._pending.append(line.encode() + b"\n")
        self._enqueued += len(records)

    async def write(self, records: list[dict[str, Any]]) -> None:
        """Make ``records`` durable, in order, chained after everything written before."""
        self._encode(records)
        target = self._enqueued
        async with self._lock:
            if self._durable >= target:
                return
            lines, self._pending = self._pending, []
            upto = self._enqueued
            try:
                await self._commit(lines)
            except (OSError, ValueError) as exc:
                raise AuditWriteError(f"{self.name}: {type(exc).__name__}") from exc
            self._durable = upto

    @abstractmethod
    async def _commit(self, lines: list[bytes]) -> None:
        """Write ``lines`` durably."""

    async def aclose(self) -> None:
        return None


class FileSink(_Chained):
    """A JSONL file, fsynced per batch, rotated by size; the chain continues across files."""

    def __init__(self, path: str, max_bytes: int, backups: int, fsync: bool = True) -> None:
        super().__init__()
        self.name = f"file:{path}"
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self._fh: Any = None
        self._last = _last_hash(self.path) or _last_hash(self._rotated(1)) or GENESIS

    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for n in range(self.backups, 0, -1):
            src = self.path if n == 1 else self._rotated(n - 1)
            if src.exists():
                os.replace(src, self._rotated(n))

    def _commit_sync(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        if self._fh is None:
            self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open across writes
        if self.max_bytes and self._fh.tell() > 0 and self._fh.tell() + len(data) > self.max_bytes:
            self._rotate()
            self._fh = open(self.path, "ab")  # noqa: SIM115
        self._fh.write(data)
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    async def _commit(self, lines: list[bytes]) -> None:
        await asyncio.to_thread(self._commit_sync, lines)

    async def aclose(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class StdoutSink(_Chained):
    """JSON lines on stdout, for a cluster log collector (the chain restarts per process)."""

    name = "stdout"

    async def _commit(self, lines: list[bytes]) -> None:
        sys.stdout.buffer.write(b"".join(lines))
        sys.stdout.buffer.flush()


class RedisStreamSink(_Chained):
    """``XADD`` to a Redis Stream, capped at about ``maxlen`` entries; one chain per process."""

    def __init__(
        self, url: str, stream: str, maxlen: int, timeout: float, mode: str = "single"
    ) -> None:
        super().__init__()
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import RedisCluster

        self.name = f"redis:{stream}"
        self.stream = stream
        self.maxlen = maxlen
        self.chain_id = f"{socket.gethostname()}:{os.getpid()}"
        self._client: Any
        if mode == "cluster":  # the stream is one key, so one slot: a pipeline stays on it
            self._client = RedisCluster.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        else:
            self._client = aioredis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )

    async def _commit(self, lines: list[bytes]) -> None:
        from redis.exceptions import RedisError

        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for line in lines:
                    pipe.xadd(
                        self.stream,
                        {"record": line.rstrip(b"\n"), "chain": self.chain_id},
                        maxlen=self.maxlen,
                        approximate=True,
                    )
                await pipe.execute()
        except RedisError as exc:
            raise OSError(str(type(exc).__name__)) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def _last_line(path: Path, block: int = 65536) -> bytes | None:
    """The last non-empty line of ``path``, however long, read backwards in blocks."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        tail = b""
        pos = end
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
            stripped = tail.rstrip(b"\n")
            cut = stripped.rfind(b"\n")
            if cut >= 0:
                return stripped[cut + 1 :]
        stripped = tail.rstrip(b"\n")
        return stripped or None


def _last_hash(path: Path) -> str | None:
    """The hash of the last record in ``path``, to continue its chain after a restart."""
    try:
        tail = _last_line(path)
    except OSError:
        return None
    if tail is None:
        return None
    try:
        value = json.loads(tail).get("hash")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def verify(paths: list[str]) -> tuple[int, str | None]:
    """Check the chain across files given oldest first: (records checked, first problem)."""
    prev: str | None = None
    count = 0
    for path in paths:
        try:
            fh = open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            return count, f"{path}: cannot read ({exc.strerror})"
        with fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(raw)
                except ValueError:
                    return count, f"{where}: not a JSON record"
                if not isinstance(record, dict) or "hash" not in record:
                    return count, f"{where}: record has no hash"
                if hashlib.sha256(canonical(record)).hexdigest() != record["hash"]:
                    return count, f"{where}: record was altered (its hash does not match)"
                if prev is not None and record.get("prev_hash") != prev:
                    return count, (
                        f"{where}: chain broken (prev_hash does not match the record before: "
                        "a record was removed, inserted or reordered)"
                    )
                prev = record["hash"]
                count += 1
    return count, None
