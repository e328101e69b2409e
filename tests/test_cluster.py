"""Quotas on a real 3-primary Redis Cluster: exact across replicas and shards, and a dead shard."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import GatewayProcess, RedisClusterServer, Sim, Tenants, base_config
from redis.crc import key_slot

from gateway.simulator import IDENTITY_HEADER
from gateway.state.redis import tenant_key

RPM = 50


def tenants_on_each_shard(cluster: RedisClusterServer) -> list[str]:
    """One tenant name whose slot is on each primary, in port order."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < len(cluster.ports):
        name = f"team-{n}"
        found.setdefault(cluster.port_of_slot(key_slot(tenant_key(name).encode())), name)
        n += 1
    return [found[p] for p in cluster.ports]


@contextmanager
def replicas(
    n: int, names: list[str], tenants: Tenants, sim: Sim, cluster: RedisClusterServer, tmp: Path
) -> Iterator[list[GatewayProcess]]:
    cfg = base_config({"swc": sim}, tenants)
    cfg["tenants"] = {
        name: {
            "keys": [tenants.entry(name)],
            "models": ["gpt-4.1"],
            "quotas": {"requests_per_minute": RPM},
        }
        for name in names
    }
    cfg["state"] = {
        "backend": "redis",
        "mode": "cluster",
        "url_env": "REDIS_URL",
        "breaker_seconds": 1.0,
        # 4 replicas, a cluster, the simulator and the client share 2 cores here: a
        # replica can be descheduled for longer than the 0.2 s default.
        "timeout_seconds": 1.0,
    }
    env = {
        "REDIS_URL": cluster.url,
        "IDENTITY_ENDPOINT": f"{sim.url}/msi/token",
        "IDENTITY_HEADER": IDENTITY_HEADER,
    }
    procs = [GatewayProcess(cfg, str(tmp), env) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


async def _burst(urls: list[str], keys: dict[str, str], per_tenant: int) -> dict[str, Any]:
    """``per_tenant`` concurrent creates for every tenant, spread over the replicas."""
    results: dict[str, list[tuple[int, float]]] = {name: [] for name in keys}

    async def one(session: aiohttp.ClientSession, name: str, i: int) -> None:
        started = time.monotonic()
        async with session.post(
            urls[i % len(urls)] + "/openai/v1/responses",
            json={"model": "gpt-4.1", "input": "x"},
            headers={"api-key": keys[name]},
        ) as r:
            await r.read()
            results[name].append((r.status, time.monotonic() - started))

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        await asyncio.gather(*(one(session, name, i) for name in keys for i in range(per_tenant)))
    return {"results": results, "seconds": time.monotonic() - started}


def _admitted(statuses: list[tuple[int, float]]) -> int:
    assert {s for s, _ in statuses} <= {200, 429}, statuses
    return sum(1 for s, _ in statuses if s == 200)


def _exact(admitted: int, seconds: float) -> bool:
    """Exactly the bucket, plus what it refilled (RPM/60 per second) while the burst ran."""
    return RPM <= admitted <= RPM + int(seconds * RPM / 60)


@pytest.fixture
def cluster(redis_cluster: RedisClusterServer) -> RedisClusterServer:
    redis_cluster.flush()
    return redis_cluster


def test_exact_across_4_replicas_and_3_shards(
    sim: Sim, tenants: Tenants, cluster: RedisClusterServer, tmp_path: Path
) -> None:
    names = tenants_on_each_shard(cluster)
    keys = {name: tenants.key(name) for name in names}
    with replicas(4, names, tenants, sim, cluster, tmp_path) as procs:
        out = asyncio.run(_burst([p.url for p in procs], keys, 200))
    for name in names:
        admitted = _admitted(out["results"][name])
        assert _exact(admitted, out["seconds"]), (name, admitted, out["seconds"])


def test_a_dead_shard_touches_only_its_tenants(
    sim: Sim, tenants: Tenants, cluster: RedisClusterServer, tmp_path: Path
) -> None:
    names = tenants_on_each_shard(cluster)
    keys = {name: tenants.key(name) for name in names}
    dead_port, dead = cluster.ports[-1], names[-1]
    alive = names[:-1]
    try:
        with replicas(4, names, tenants, sim, cluster, tmp_path) as procs:
            urls = [p.url for p in procs]
            warm = asyncio.run(_burst(urls, keys, 4))  # topology known, buckets started
            assert all(_admitted(r) == 4 for r in warm["results"].values())
            cluster.kill(dead_port)
            out = asyncio.run(_burst(urls, keys, 200))
            # Tenants on the live shards keep their quotas exactly (4 already spent).
            for name in alive:
                admitted = _admitted(out["results"][name]) + 4
                assert _exact(admitted, out["seconds"] + warm["seconds"]), (name, admitted)
            # The dead shard's tenant is served without quotas (on_state_error: allow),
            # and no faster or slower than a bounded timeout allows.
            lost = out["results"][dead]
            assert _admitted(lost) == 200
            slowest_alive = max(t for name in alive for _, t in out["results"][name])
            assert max(t for _, t in lost) <= slowest_alive + 0.35
            metrics = aiohttp_get(urls[0] + "/metrics")
            assert 'gateway_state_breaker_events_total{event="tripped"' in metrics

            # The shard comes back: quotas apply again, no gateway restart.
            cluster.start_node(dead_port)
            cluster.wait_ok()
            time.sleep(1.5)  # past the breaker interval
            back = asyncio.run(_burst(urls, {dead: keys[dead]}, 120))
            admitted = _admitted(back["results"][dead])
            assert _exact(admitted, back["seconds"] + 2), admitted
    finally:
        if dead_port not in cluster.procs:
            cluster.start_node(dead_port)
            cluster.wait_ok()


def aiohttp_get(url: str) -> str:
    async def get() -> str:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return await r.text()

    return asyncio.run(get())
