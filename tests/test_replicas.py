"""Several gateway processes sharing one Redis: quotas, bindings, failures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import GatewayProcess, RedisServer, Sim, Tenants, base_config

from gateway.simulator import IDENTITY_HEADER


@contextmanager
def replicas(
    n: int, cfg: dict[str, Any], sim: Sim, redis: RedisServer, tmp: Path
) -> Iterator[list[GatewayProcess]]:
    env = {
        "REDIS_URL": redis.url,
        "IDENTITY_ENDPOINT": f"{sim.url}/msi/token",
        "IDENTITY_HEADER": IDENTITY_HEADER,
    }
    # timeout 1 s: replicas, simulator and client share two cores here (see conftest.backend)
    state = {"backend": "redis", "url_env": "REDIS_URL", "timeout_seconds": 1.0}
    cfg = {**cfg, "state": {**state, **cfg.get("state", {})}}
    procs = [GatewayProcess(cfg, str(tmp), env) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


def _post(url: str, key: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "x"},
        headers={"api-key": key, **headers},
        timeout=20,
    )


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    redis_server.flush()
    return redis_server


def test_rate_limit_holds_across_replicas(
    sim: Sim, tenants: Tenants, redis: RedisServer, tmp_path: Path
) -> None:
    cfg = base_config({"swc": sim}, tenants)
    cfg["tenants"]["team-a"]["quotas"] = {"requests_per_minute": 5}
    key = tenants.key("team-a")
    with replicas(2, cfg, sim, redis, tmp_path) as (r1, r2):
        urls = [r1.url, r2.url] * 8
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda u: _post(u, key).status_code, urls))
    assert sorted(statuses) == [200] * 5 + [429] * 11


def test_response_made_on_one_replica_is_served_by_another(
    sim: Sim, tenants: Tenants, redis: RedisServer, tmp_path: Path
) -> None:
    cfg = base_config({"swc": sim}, tenants)
    a, b = tenants.key("team-a"), tenants.key("team-b")
    with replicas(2, cfg, sim, redis, tmp_path) as (r1, r2):
        rid = _post(r1.url, a).json()["id"]
        got = httpx.get(f"{r2.url}/openai/v1/responses/{rid}", headers={"api-key": a})
        other = httpx.get(f"{r2.url}/openai/v1/responses/{rid}", headers={"api-key": b})
        cancel = httpx.post(f"{r2.url}/openai/v1/responses/{rid}/cancel", headers={"api-key": b})
        deleted = httpx.delete(f"{r2.url}/openai/v1/responses/{rid}", headers={"api-key": a})
        after = httpx.get(f"{r1.url}/openai/v1/responses/{rid}", headers={"api-key": a})
    assert got.status_code == 200 and got.json()["id"] == rid
    assert other.status_code == 404 and cancel.status_code == 404
    assert deleted.status_code == 200
    assert after.status_code == 404


def test_leases_of_a_dead_replica_expire(
    sim: Sim, tenants: Tenants, redis: RedisServer, tmp_path: Path
) -> None:
    cfg = base_config({"swc": sim}, tenants, state={"lease_seconds": 1.5})
    cfg["tenants"]["team-a"]["quotas"] = {"max_concurrent_requests": 1}
    key = tenants.key("team-a")
    body = {"model": "gpt-4.1", "input": " ".join(["w"] * 50), "stream": True}
    with replicas(2, cfg, sim, redis, tmp_path) as (r1, r2):
        with httpx.stream(
            "POST",
            f"{r1.url}/openai/v1/responses",
            json=body,
            headers={"api-key": key, "x-sim-delay": "0.2"},
            timeout=20,
        ) as stream:
            chunks = stream.iter_raw()
            next(chunks)
            assert _post(r2.url, key).status_code == 429
            r1.stop(kill=True)  # the replica dies holding the lease
        assert _post(r2.url, key).status_code == 429
        time.sleep(1.6)
        assert _post(r2.url, key).status_code == 200


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_redis_outage(
    sim: Sim, tenants: Tenants, redis: RedisServer, tmp_path: Path, policy: str
) -> None:
    cfg = base_config({"swc": sim}, tenants, state={"on_state_error": policy})
    cfg["tenants"]["team-a"]["quotas"] = {"requests_per_minute": 1000}
    key = tenants.key("team-a")
    with replicas(1, cfg, sim, redis, tmp_path) as (r1,):
        assert _post(r1.url, key).status_code == 200
        assert httpx.get(r1.url + "/readyz").status_code == 200
        redis.stop()
        try:
            started = time.monotonic()
            down = _post(r1.url, key)
            assert time.monotonic() - started < 3  # no hang on a dead Redis
            ready = httpx.get(r1.url + "/readyz")
            metrics = httpx.get(r1.url + "/metrics").text
        finally:
            redis.start()
        assert 'gateway_state_errors_total{operation="admit"}' in metrics
        assert "gateway_state_breaker_open 1.0" in metrics
        if policy == "allow":
            # Serving through the outage: the replica stays in the Service, degraded.
            assert down.status_code == 200
            assert ready.status_code == 200 and "state" in ready.json()["degraded"][0]
        else:
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "state_unavailable"
            assert ready.status_code == 503 and "state" in ready.json()["problems"][0]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            health = httpx.get(r1.url + "/readyz").json()
            if health["ready"] and not health["degraded"]:
                break
            time.sleep(0.1)
        assert httpx.get(r1.url + "/readyz").json() == {
            "ready": True,
            "problems": [],
            "degraded": [],
        }
        back = _post(r1.url, key)
        assert back.status_code == 200
        assert back.headers["x-ratelimit-limit-requests"] == "1000"
