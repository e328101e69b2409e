"""A black-holed Redis (SIGSTOP: connections hang, nothing refuses) and its recovery;
a healthy Redis behind a late event loop, which is not an outage."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import RedisServer, Sim, Tenants, base_config, gateway
from redis.asyncio.connection import AbstractConnection

from gateway.keys import hash_key, new_key

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


def test_late_loop_is_not_an_outage(
    identity: Sim, tenants: Tenants, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A healthy Redis behind a starved event loop: its answer arrives at once, the loop
    reads it late, past the 0.2 s timeout. That is no outage: no request passes without
    its quota, none is counted twice, the breaker stays closed, every charge lands once.

    The loop is starved (blocked 0.3 s, as by a burst of work) right after every fifth
    Redis command is sent, so that each starvation finds a command in flight.
    """
    sent = [0]
    send = AbstractConnection.send_packed_command

    async def send_then_starve(self: AbstractConnection, *args: Any, **kw: Any) -> None:
        await send(self, *args, **kw)
        sent[0] += 1
        if sent[0] % 5 == 0:
            asyncio.get_running_loop().call_soon(time.sleep, 0.3)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", send_then_starve)
    redis = RedisServer(str(tmp_path)).start()
    cfg = base_config(
        {"swc": identity},
        tenants,
        state={"backend": "redis", "url_env": "REDIS_URL", "on_state_error": "allow"},
    )
    cfg["tenants"]["team-a"]["quotas"] = {"requests_per_minute": 20}
    admin = new_key()
    cfg["admin"] = {"key_sha256": hash_key(admin)}
    key = tenants.key("team-a")
    body = {"model": "gpt-4.1", "input": "x"}
    day = datetime.now(UTC).date().isoformat()
    results: list[httpx.Response] = []
    try:
        with gateway(cfg, {"REDIS_URL": redis.url}) as gw:
            began = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: _post(gw.url, key, body), range(32)))
            took = time.monotonic() - began
            answered_n = sum(r.status_code == 200 for r in results)
            # A request settles after its answer is sent, on a loop starved on purpose:
            # the ledger is read once the last settle had its chance.
            deadline = time.monotonic() + 10
            while True:
                usage = httpx.get(
                    gw.url + "/admin/usage",
                    headers={"api-key": admin},
                    params={"from": day, "to": day, "tenant": "team-a"},
                ).json()
                if (usage and usage[0]["requests"] >= answered_n) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            metrics = httpx.get(gw.url + "/metrics").text
    finally:
        redis.stop()
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429}, codes
    assert sent[0] > 50  # the starvation did happen, many times
    assert 'gateway_state_breaker_events_total{event="late",operation="admit"}' in metrics
    assert 'gateway_state_breaker_events_total{event="tripped"' not in metrics
    # Every admission was Redis's: none passed unchecked (on_state_error: allow would
    # have let it), none was counted twice. The bucket refills 1/3 request a second.
    assert "gateway_state_errors_total{" not in metrics
    assert 20 <= codes.count(200) <= 20 + int(took / 3) + 1, (codes.count(200), took)
    answered = [r.json()["usage"] for r in results if r.status_code == 200]
    assert len(usage) == 1 and usage[0]["requests"] == len(answered)  # each charged once
    assert usage[0]["input_tokens"] == sum(u["input_tokens"] for u in answered)
    assert usage[0]["output_tokens"] == sum(u["output_tokens"] for u in answered)
