"""Where gateway keys made through the admin API live: memory (one replica) or Redis.

A key is stored only as hashes: its current SHA-256 and, after a rotation, the previous
one until its grace ends. Every change bumps a version counter, which each replica polls
to refresh its cache (``gateway/apikeys.py``). On Redis every key of the store shares
the ``{keys}`` hash tag, so a change is one transaction on one Cluster slot:

    gw:{keys}:k:ID   the key's record (JSON)      gw:{keys}:h:SHA256  -> ID
    gw:{keys}:ids    the set of ids               gw:{keys}:v         the version
    gw:{keys}:used   ID -> last used (epoch s)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, TypeVar

T = TypeVar("T")


class ApiKey(NamedTuple):
    """A key made through the admin API (never its secret)."""

    id: str
    tenant: str
    name: str
    created_at: float
    expires_at: float | None
    hashes: tuple[tuple[str, float | None], ...]  # (sha256, usable until; None: no end)
    metadata: dict[str, str] = {}

    def to_json(self) -> str:
        return json.dumps(self._asdict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ApiKey:
        data = json.loads(raw)
        data["hashes"] = tuple((h, until) for h, until in data["hashes"])
        return cls(**data)

    def usable(self, now: float) -> tuple[str, ...]:
        """The hashes that still open the key at ``now``."""
        return tuple(h for h, until in self.hashes if until is None or until > now)


class KeyStore(Protocol):
    """Keys made at runtime, shared by the replicas of one state backend."""

    async def put(self, key: ApiKey, dropped: tuple[str, ...] = ()) -> None:
        """Write ``key`` (index its hashes, forget ``dropped`` ones) and bump the version."""

    async def get(self, key_id: str) -> ApiKey | None: ...

    async def by_hash(self, sha256: str) -> ApiKey | None: ...

    async def all(self) -> list[ApiKey]: ...

    async def delete(self, key: ApiKey) -> None:
        """Forget ``key`` and its hashes, and bump the version."""

    async def version(self) -> int: ...

    async def touch(self, used: dict[str, float]) -> None:
        """Record when keys were last used (the later time wins)."""

    async def last_used(self) -> dict[str, float]: ...


class MemoryKeyStore:
    """Keys of one replica (the memory state backend): lost on restart."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKey] = {}
        self.hashes: dict[str, str] = {}
        self.used: dict[str, float] = {}
        self._version = 0

    async def put(self, key: ApiKey, dropped: tuple[str, ...] = ()) -> None:
        for h in dropped:
            self.hashes.pop(h, None)
        self.keys[key.id] = key
        for h, _ in key.hashes:
            self.hashes[h] = key.id
        self._version += 1

    async def get(self, key_id: str) -> ApiKey | None:
        return self.keys.get(key_id)

    async def by_hash(self, sha256: str) -> ApiKey | None:
        key_id = self.hashes.get(sha256)
        return self.keys.get(key_id) if key_id is not None else None

    async def all(self) -> list[ApiKey]:
        return list(self.keys.values())

    async def delete(self, key: ApiKey) -> None:
        self.keys.pop(key.id, None)
        self.used.pop(key.id, None)
        for h, _ in key.hashes:
            self.hashes.pop(h, None)
        self._version += 1

    async def version(self) -> int:
        return self._version

    async def touch(self, used: dict[str, float]) -> None:
        for key_id, at in used.items():
            self.used[key_id] = max(at, self.used.get(key_id, 0.0))

    async def last_used(self) -> dict[str, float]:
        return dict(self.used)


_P = "gw:{keys}:"
# HSET only if later: last-used times from several replicas never go back.
_TOUCH = """
for i = 1, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > old then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


class RedisKeyStore:
    """Keys in Redis, shared by every replica and kept across restarts."""

    def __init__(self, client: Any, call: Callable[[str, Callable[[], Awaitable[Any]]], Any]):
        self._client = client
        self._call = call
        self._touch = client.register_script(_TOUCH)

    async def put(self, key: ApiKey, dropped: tuple[str, ...] = ()) -> None:
        async def op() -> None:
            pipe = self._client.pipeline(transaction=True)
            for h in dropped:
                pipe.delete(f"{_P}h:{h}")
            pipe.set(f"{_P}k:{key.id}", key.to_json())
            for h, _ in key.hashes:
                pipe.set(f"{_P}h:{h}", key.id)
            pipe.sadd(f"{_P}ids", key.id)
            pipe.incr(f"{_P}v")
            await pipe.execute()

        await self._call("keys", op)

    async def get(self, key_id: str) -> ApiKey | None:
        raw = await self._call("keys", lambda: self._client.get(f"{_P}k:{key_id}"))
        return ApiKey.from_json(raw) if raw else None

    async def by_hash(self, sha256: str) -> ApiKey | None:
        key_id = await self._call("keys", lambda: self._client.get(f"{_P}h:{sha256}"))
        if not key_id:
            return None
        return await self.get(key_id.decode() if isinstance(key_id, bytes) else key_id)

    async def all(self) -> list[ApiKey]:
        ids = await self._call("keys", lambda: self._client.smembers(f"{_P}ids"))
        if not ids:
            return []
        names = [f"{_P}k:{i.decode() if isinstance(i, bytes) else i}" for i in ids]
        raws = await self._call("keys", lambda: self._client.mget(names))
        return [ApiKey.from_json(raw) for raw in raws if raw]

    async def delete(self, key: ApiKey) -> None:
        async def op() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(f"{_P}k:{key.id}")
            for h, _ in key.hashes:
                pipe.delete(f"{_P}h:{h}")
            pipe.srem(f"{_P}ids", key.id)
            pipe.hdel(f"{_P}used", key.id)
            pipe.incr(f"{_P}v")
            await pipe.execute()

        await self._call("keys", op)

    async def version(self) -> int:
        raw = await self._call("keys", lambda: self._client.get(f"{_P}v"))
        return int(raw or 0)

    async def touch(self, used: dict[str, float]) -> None:
        if not used:
            return
        args: list[Any] = []
        for key_id, at in used.items():
            args += [key_id, f"{at:.0f}"]
        await self._call("keys", lambda: self._touch(keys=[f"{_P}used"], args=args))

    async def last_used(self) -> dict[str, float]:
        raw = await self._call("keys", lambda: self._client.hgetall(f"{_P}used"))
        return {
            (k.decode() if isinstance(k, bytes) else k): float(v) for k, v in (raw or {}).items()
        }
