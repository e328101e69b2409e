"""The runtime key store on every backend: memory, the embedded file, one Redis, a Redis
Cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.state.keystore import ApiKey, KeyStore, MemoryKeyStore


@pytest.fixture(params=["memory", "sqlite", "redis", "cluster"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "memory":
        return lambda: (MemoryKeyStore(), None)
    if request.param == "sqlite":
        from gateway.state.sqlite import SqliteState

        def embedded() -> tuple[KeyStore, Any]:
            state = SqliteState(str(tmp_path / "state.db"))
            return state.key_store(), state

        return embedded
    from gateway.state.redis import RedisState

    if request.param == "cluster":
        server = request.getfixturevalue("redis_cluster")
        mode = "cluster"
    else:
        server = request.getfixturevalue("redis_server")
        mode = "single"
    server.flush()

    def make() -> tuple[KeyStore, Any]:
        state = RedisState(server.url, timeout=1.0, mode=mode)
        return state.key_store(), state

    return make


def test_put_lookup_rotate_delete(store_factory: Any) -> None:
    async def scenario() -> None:
        store, state = store_factory()
        if state is not None:
            await state.connect()
        try:
            v0 = await store.version()
            key = ApiKey("key_1", "team-a", "ci", 1.0, None, (("a" * 64, None),), {"x": "y"})
            await store.put(key)
            assert await store.version() > v0
            assert await store.get("key_1") == key
            assert await store.by_hash("a" * 64) == key
            assert await store.by_hash("b" * 64) is None
            rotated = key._replace(hashes=(("b" * 64, None), ("a" * 64, 5.0)))
            await store.put(rotated)
            assert await store.by_hash("a" * 64) == rotated == await store.by_hash("b" * 64)
            # A rotation without grace drops the old hash from the index.
            again = rotated._replace(hashes=(("c" * 64, None),))
            await store.put(again, dropped=("a" * 64, "b" * 64))
            assert await store.by_hash("a" * 64) is None and await store.by_hash("b" * 64) is None
            assert [k.id for k in await store.all()] == ["key_1"]
            await store.touch({"key_1": 100.0, "cfg-key": 50.0})
            await store.touch({"key_1": 90.0})  # older: never goes back
            assert await store.last_used() == {"key_1": 100.0, "cfg-key": 50.0}
            before = await store.version()
            await store.delete(again)
            assert await store.version() > before
            assert await store.get("key_1") is None and await store.by_hash("c" * 64) is None
            assert await store.all() == []
            assert await store.last_used() == {"cfg-key": 50.0}
        finally:
            if state is not None:
                await state.aclose()

    asyncio.run(scenario())
