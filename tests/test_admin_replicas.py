"""Runtime keys across replicas on one Redis: made on one, used on the other at once;
rotation and revocation hold on every replica within a second; keys survive a restart;
with Redis stopped, cached keys keep working and an unseen key is 503, never 401."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
from harness import RedisServer, Sim, Tenants, base_config
from test_replicas import replicas

from gateway.keys import hash_key, new_key

ADMIN = new_key()


def _use(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "x"},
        headers={"api-key": key},
        timeout=20,
    )


def _admin(url: str, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(
        method, url + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=20, **kw
    )  # type: ignore[arg-type]


def _within(seconds: float, check: object) -> float:
    """How long until ``check()`` held (fails past ``seconds``)."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < seconds, "did not happen in time"
        time.sleep(0.02)
    return time.monotonic() - start


def test_keys_across_replicas(
    sim: Sim, tenants: Tenants, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.flush()
    cfg = base_config({"swc": sim}, tenants)
    cfg["admin"] = {"key_sha256": hash_key(ADMIN)}
    with replicas(2, cfg, sim, redis_server, tmp_path) as (r1, r2):
        made = _admin(r1.url, "POST", "/admin/keys", json={"tenant": "team-a", "name": "ci"})
        assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["id"]
        assert _use(r2.url, key).status_code == 200  # at once, on the other replica
        assert _use(r1.url, key).status_code == 200
        # Rotation with a 3 s grace, made on r2: the old secret works on both, then on neither.
        rot = _admin(r2.url, "POST", f"/admin/keys/{key_id}/rotate", json={"grace_seconds": 3})
        new = rot.json()["key"]
        for url in (r1.url, r2.url):
            assert _use(url, key).status_code == 200 and _use(url, new).status_code == 200
        time.sleep(3.1)
        for url in (r1.url, r2.url):
            assert _use(url, key).status_code == 401 and _use(url, new).status_code == 200
        # Revoked on r1: refused on r2 within a second.
        assert _admin(r1.url, "DELETE", f"/admin/keys/{key_id}").status_code == 200
        took = _within(1.0, lambda: _use(r2.url, new).status_code == 401)
        assert took < 1.0
        # A key made before a restart works after it.
        kept = _admin(r1.url, "POST", "/admin/keys", json={"tenant": "team-b", "name": "kept"})
        r2.stop()
        r2.start()
        assert _use(r2.url, kept.json()["key"]).status_code == 200
        listed = _admin(r2.url, "GET", "/admin/keys?tenant=team-b").json()["data"]
        assert any(row["id"] == kept.json()["id"] for row in listed)


def test_redis_stopped_cached_keys_work_unseen_are_503(
    sim: Sim, tenants: Tenants, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.flush()
    cfg = base_config({"swc": sim}, tenants)
    cfg["admin"] = {"key_sha256": hash_key(ADMIN)}
    with replicas(1, cfg, sim, redis_server, tmp_path) as (r1,):
        key = _admin(r1.url, "POST", "/admin/keys", json={"tenant": "team-a", "name": "x"})
        key = key.json()["key"]
        assert _use(r1.url, key).status_code == 200
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            assert _use(r1.url, key).status_code == 200  # cached: served without quotas
            unseen = _use(r1.url, new_key())
            assert unseen.status_code == 503, unseen.text
            assert unseen.json()["error"]["code"] == "state_unavailable"
            assert _use(r1.url, tenants.key("team-b")).status_code == 200  # config keys
            assert _use(r1.url, "not-a-gateway-key").status_code == 401
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
