"""A black-holed Redis (SIGSTOP: connections hang, nothing refuses) and its recovery."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from harness import RedisServer, Sim, Tenants, base_config, gateway

URL = "/openai/v1/responses"


def _post(url: str, key: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(url + URL, json=body, headers={"api-key": key, **kw}, timeout=30)


def _timed(url: str, key: str, body: dict[str, Any]) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    r = _post(url, key, body)
    return time.perf_counter() - started, r


def test_black_holed_redis(identity: Sim, tenants: Tenants, tmp_path: Path) -> None:
    redis = RedisServer(str(tmp_path)).start()
    assert redis.proc is not None
    cfg = base_config(
        {"swc": identity},
        tenants,
        state={"backend": "redis", "url_env": "REDIS_URL", "breaker_seconds": 2.0},
    )
    cfg["tenants"]["team-a"]["quotas"] = {"max_concurrent_requests": 1}
    env = {"REDIS_URL": redis.url}
    key = tenants.key("team-a")
    body = {"model": "gpt-4.1", "input": "x"}
    try:
        with gateway(cfg, env) as gw, gateway(cfg, env) as other:
            healthy = [_timed(gw.url, key, body)[0] for _ in range(20)]
            base = statistics.median(healthy)

            # A stream holds the tenant's only slot when Redis goes silent; its release
            # then fails, and must be retried once Redis is back.
            stream: list[httpx.Response] = []
            slow = {**body, "stream": True}
            t = threading.Thread(
                target=lambda: stream.append(
                    _post(gw.url, key, slow, **{"x-sim-delay": "0.05"})  # type: ignore[arg-type]
                )
            )
            t.start()
            time.sleep(0.3)
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                t.join(10)
                assert stream and stream[0].status_code == 200
                during: list[float] = []
                created: list[str] = []
                deadline = time.monotonic() + 5  # longer than the breaker interval
                while time.monotonic() < deadline:
                    took, r = _timed(gw.url, key, body)
                    assert r.status_code == 200, r.text
                    during.append(took)
                    created.append(r.json()["id"])
                # Made during the outage, bound on this replica meanwhile.
                assert _post_get(gw.url, key, created[0]).status_code == 200
                metrics = httpx.get(gw.url + "/metrics").text
                ready = httpx.get(gw.url + "/readyz")
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            added = max(during) - base
            print(
                f"black-holed Redis: median {statistics.median(during) * 1000:.1f} ms, "
                f"max {max(during) * 1000:.1f} ms, healthy median {base * 1000:.1f} ms, "
                f"{len(during)} requests"
            )
            assert added <= 0.35, f"a request took {added * 1000:.0f} ms longer"
            assert 'gateway_state_breaker_events_total{event="skipped"' in metrics
            assert ready.status_code == 200 and ready.json()["degraded"]

            # Back: within seconds the queued release lands, the slot is free, and the
            # bindings made during the outage are in Redis for every replica.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if "gateway_state_retry_queue 0.0" in httpx.get(gw.url + "/metrics").text:
                    break
                time.sleep(0.1)
            assert "gateway_state_retry_queue 0.0" in httpx.get(gw.url + "/metrics").text
            hold = threading.Thread(
                target=lambda: _post(gw.url, key, slow, **{"x-sim-delay": "0.1"})  # type: ignore[arg-type]
            )
            hold.start()
            time.sleep(0.3)
            refused = _post(other.url, key, body)
            hold.join(10)
            assert refused.status_code == 429  # the cap is enforced again, across replicas
            assert _post(other.url, key, body).status_code == 200
            for rid in created:
                assert _post_get(other.url, key, rid).status_code == 200
    finally:
        redis.stop()


def _post_get(url: str, key: str, rid: str) -> httpx.Response:
    return httpx.get(f"{url}{URL}/{rid}", headers={"api-key": key}, timeout=30)
