"""Routing under pressure: PTU first with spillover, weights, breakers, shared trips."""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import GatewayProcess, RedisServer, Server, Sim, Tenants, base_config, gateway

from gateway.simulator import IDENTITY_HEADER

URL = "/openai/v1/responses"
BODY = {"model": "gpt-4.1", "input": "x"}


def _cfg(
    sims: dict[str, Sim], tenants: Tenants, targets: list[dict[str, Any]], **over: Any
) -> dict[str, Any]:
    cfg = base_config(sims, tenants, **over)
    cfg["models"] = {"gpt-4.1": targets}
    cfg["tenants"]["team-a"]["models"] = ["gpt-4*"]  # every entry must match a model
    return cfg


def _post(client: httpx.Client, key: str) -> httpx.Response:
    return client.post(URL, json=BODY, headers={"api-key": key})


def _state(gw_url: str, resource: str, deployment: str) -> float:
    text = httpx.get(gw_url + "/metrics").text
    line = f'gateway_target_state{{deployment="{deployment}",resource="{resource}"}} '
    return float(text.split(line, 1)[1].split("\n", 1)[0])


PTU_FIRST = [
    {"resource": "ptu", "deployment": "d-ptu", "priority": 0},
    {"resource": "payg", "deployment": "d-payg", "priority": 1},
]


@pytest.fixture
def ptu_payg(identity: Sim, sim2: Sim, tenants: Tenants) -> Iterator[tuple[Server, Sim, Sim]]:
    cfg = _cfg({"ptu": identity, "payg": sim2}, tenants, PTU_FIRST)
    with gateway(cfg) as gw:
        yield gw, identity, sim2


def test_ptu_first_spills_on_retry_after_and_probes_back(
    ptu_payg: tuple[Server, Sim, Sim], tenants: Tenants
) -> None:
    gw, ptu, payg = ptu_payg
    key = tenants.key("team-a")
    with httpx.Client(base_url=gw.url) as client:
        for _ in range(5):
            assert _post(client, key).status_code == 200
        assert len(ptu.state.api_requests()) == 5 and payg.state.api_requests() == []
        ptu.state.fail_queue.append(429)
        ptu.state.fail_headers = {"retry-after-ms": "2000", "retry-after": "2"}
        tripped = time.monotonic()
        r = _post(client, key)
        assert r.status_code == 200 and r.headers["x-ms-region"] == "francecentral"
        assert _state(gw.url, "ptu", "d-ptu") == 2
        seen = len(ptu.state.api_requests())
        while time.monotonic() - tripped < 1.7:  # the window: PAYG only, PTU untouched
            r = _post(client, key)
            assert r.status_code == 200 and r.headers["x-ms-region"] == "francecentral"
        assert len(ptu.state.api_requests()) == seen
        time.sleep(max(0.0, 2.1 - (time.monotonic() - tripped)))
        r = _post(client, key)  # the probe
        assert r.status_code == 200 and r.headers["x-ms-region"] == "swedencentral"
        assert _state(gw.url, "ptu", "d-ptu") == 0
        metrics = httpx.get(gw.url + "/metrics").text
    assert (
        'gateway_target_breaker_events_total{deployment="d-ptu",event="trip",resource="ptu"} 1.0'
        in metrics
    )
    assert 'event="probe",resource="ptu"} 1.0' in metrics
    assert 'gateway_spillover_total{model="gpt-4.1",tenant="team-a"}' in metrics


def test_weights_split_traffic(identity: Sim, sim2: Sim, tenants: Tenants) -> None:
    targets = [
        {"resource": "a", "deployment": "d-a", "priority": 0, "weight": 3},
        {"resource": "b", "deployment": "d-b", "priority": 0, "weight": 1},
    ]
    key = tenants.key("team-a")
    with (
        gateway(_cfg({"a": identity, "b": sim2}, tenants, targets)) as gw,
        httpx.Client(base_url=gw.url) as client,
    ):
        for _ in range(1000):
            assert _post(client, key).status_code == 200
    share = len(identity.state.api_requests()) / 1000
    assert 0.71 <= share <= 0.79, share


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BlackHole:
    """A port whose accept queue is full: new connections hang until they time out."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", self.port))
            self.fillers.append(c)

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


def _interleaved_p50s(
    a: httpx.Client, b: httpx.Client, key: str, n: int = 100
) -> tuple[float, float]:
    """p50 latency of ``a`` and of ``b``, requests alternating so drift hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        for client, out in ((a, times[0]), (b, times[1])):
            t = time.perf_counter()
            assert _post(client, key).status_code == 200
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


@pytest.mark.parametrize("dead", ["refused", "black_hole"])
def test_dead_target_is_skipped_without_added_latency(
    identity: Sim, tenants: Tenants, dead: str
) -> None:
    hole = BlackHole() if dead == "black_hole" else None
    port = hole.port if hole else _refused_port()
    key = tenants.key("team-a")
    targets = [
        {"resource": "dead", "deployment": "d-dead", "priority": 0},
        {"resource": "swc", "deployment": "d-swc", "priority": 1},
    ]
    cfg = _cfg({"swc": identity}, tenants, targets)
    cfg["resources"]["dead"] = {"endpoint": f"http://127.0.0.1:{port}", "region": "swedencentral"}
    cfg["upstream"].update(connect_timeout=0.3, read_timeout=5)
    healthy_cfg = _cfg({"swc": identity}, tenants, targets[1:])
    healthy_cfg["state"] = {"backend": "sqlite", "path": "healthy-state.db"}  # its own file
    try:
        with (
            gateway(healthy_cfg) as ok_gw,
            gateway(cfg) as gw,
            httpx.Client(base_url=ok_gw.url) as ok_client,
            httpx.Client(base_url=gw.url) as client,
        ):
            for _ in range(5):  # the default rule: 5 failures within 10 s open it
                assert _post(client, key).status_code == 200
            assert _state(gw.url, "dead", "d-dead") == 2
            healthy, skipping = _interleaved_p50s(ok_client, client, key)
    finally:
        if hole:
            hole.close()
    print(
        f"{dead}: p50 healthy-only {healthy * 1000:.2f} ms, dead skipped {skipping * 1000:.2f} ms"
    )
    assert abs(skipping - healthy) < 0.001


def test_a_day_long_retry_after_is_capped(identity: Sim, sim2: Sim, tenants: Tenants) -> None:
    cfg = _cfg(
        {"ptu": identity, "payg": sim2}, tenants, PTU_FIRST, breaker={"max_retry_after_seconds": 1}
    )
    key = tenants.key("team-a")
    with gateway(cfg) as gw, httpx.Client(base_url=gw.url) as client:
        identity.state.fail_queue.append(429)
        identity.state.fail_headers = {"retry-after": "86400"}
        assert _post(client, key).headers["x-ms-region"] == "francecentral"
        assert _state(gw.url, "ptu", "d-ptu") == 2
        time.sleep(1.1)
        assert _post(client, key).headers["x-ms-region"] == "swedencentral"


def test_all_targets_open(identity: Sim, sim2: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    cfg = _cfg({"ptu": identity, "payg": sim2}, tenants, PTU_FIRST)
    with gateway(cfg) as gw, httpx.Client(base_url=gw.url) as client:
        for sim in (identity, sim2):
            sim.state.fail_queue.append(429)
            sim.state.fail_headers = {"retry-after": "30"}
        assert _post(client, key).status_code == 429  # the last target's own answer
        before = len(identity.state.api_requests()) + len(sim2.state.api_requests())
        r = _post(client, key)
        assert r.status_code == 429 and r.json()["error"]["code"] == "all_targets_throttled"
        assert 28 <= int(r.headers["retry-after"]) <= 30
        assert len(identity.state.api_requests()) + len(sim2.state.api_requests()) == before
    cfg = _cfg(
        {"ptu": identity}, tenants, PTU_FIRST[:1], breaker={"failures": 1, "open_seconds": 20}
    )
    cfg["resources"]["ptu"]["endpoint"] = f"http://127.0.0.1:{_refused_port()}"
    with gateway(cfg) as gw, httpx.Client(base_url=gw.url) as client:
        assert _post(client, key).status_code == 502
        r = _post(client, key)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_target"
        assert 18 <= int(r.headers["retry-after"]) <= 20 and r.headers["x-request-id"]
        assert "gateway_targets_unavailable_total" in httpx.get(gw.url + "/metrics").text


def test_a_trip_is_shared_through_redis(
    sim: Sim, sim2: Sim, tenants: Tenants, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.flush()
    cfg = _cfg({"ptu": sim, "payg": sim2}, tenants, PTU_FIRST)
    cfg["state"] = {"backend": "redis", "url_env": "REDIS_URL"}
    env = {
        "REDIS_URL": redis_server.url,
        "IDENTITY_ENDPOINT": f"{sim.url}/msi/token",
        "IDENTITY_HEADER": IDENTITY_HEADER,
    }
    r1 = GatewayProcess(cfg, str(tmp_path), env).start()
    r2 = GatewayProcess(cfg, str(tmp_path), env).start()
    key = tenants.key("team-a")
    try:
        with httpx.Client(base_url=r2.url) as c2, httpx.Client(base_url=r1.url) as c1:
            assert _post(c2, key).headers["x-ms-region"] == "swedencentral"
            sim.state.fail_queue.append(429)
            sim.state.fail_headers = {"retry-after-ms": "10000"}
            assert _post(c1, key).headers["x-ms-region"] == "francecentral"  # replica 1 trips
            seen = len(sim.state.api_requests())
            time.sleep(1.2)  # replicas refresh the shared view every second
            assert _post(c2, key).headers["x-ms-region"] == "francecentral"
            assert len(sim.state.api_requests()) == seen  # replica 2 never tried PTU
            assert _state(r2.url, "ptu", "d-ptu") == 2
            assert 'event="trip_shared"' in httpx.get(r2.url + "/metrics").text
    finally:
        r1.stop()
        r2.stop()


def test_a_probe_given_back_can_be_taken_again() -> None:
    from gateway.breaker import Breakers
    from gateway.config import BreakerConfig

    b = Breakers(BreakerConfig(failures=1, open_seconds=0.01))
    b.failure("r/d", None, None)  # opens (no event loop needed without a store)
    time.sleep(0.02)
    assert b.acquire("r/d")  # the probe
    assert not b.acquire("r/d")  # one at a time
    b.release("r/d")  # the request holding it was cancelled
    assert b.acquire("r/d")
