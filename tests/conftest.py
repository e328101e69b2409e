from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import (
    RedisClusterServer,
    RedisServer,
    Server,
    Sim,
    Tenants,
    base_config,
    gateway,
    simulator,
)

from gateway.simulator import IDENTITY_HEADER


@pytest.fixture(autouse=True)
def own_directory(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own directory: a gateway on the default backend (sqlite,
    ``gateway-state.db`` in the working directory) starts from an empty file of its own."""
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]


@pytest.fixture
def sim() -> Iterator[Sim]:
    with simulator("swedencentral") as s:
        yield s


@pytest.fixture
def sim2() -> Iterator[Sim]:
    with simulator("francecentral") as s:
        yield s


@pytest.fixture
def tenants() -> Tenants:
    return Tenants()


@pytest.fixture
def identity(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Sim:
    """azure-identity's managed-identity flow, pointed at the simulator's token endpoint."""
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{sim.url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
    for var in (
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_CLIENT_SECRET",
    ):
        monkeypatch.delenv(var, raising=False)
    return sim


@pytest.fixture
def gw(identity: Sim, tenants: Tenants) -> Iterator[Server]:
    """A gateway in front of one simulator, with tenants team-a and team-b."""
    with gateway(base_config({"swc": identity}, tenants)) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    cluster = RedisClusterServer(str(tmp_path_factory.mktemp("cluster"))).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["memory", "sqlite", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> tuple[dict[str, object], dict[str, str]]:
    """(state config, environment) for each state backend: memory, the embedded file
    (sqlite), one Redis, a cluster."""
    if request.param in ("memory", "sqlite"):
        return {"backend": request.param}, {}
    # These gateways run in the test process, sharing one GIL with the simulator and the
    # client threads: their event loop can stall past the 0.2 s production default and
    # trip the breaker on a healthy Redis (the overload trade-off the README documents;
    # tests/test_state_faults.py measures the default itself).
    timeout = 1.0
    if request.param == "cluster":
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        cluster.flush()
        state = {"backend": "redis", "mode": "cluster", "url_env": "REDIS_URL"}
        return {**state, "timeout_seconds": timeout}, {"REDIS_URL": cluster.url}
    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()
    state = {"backend": "redis", "url_env": "REDIS_URL", "timeout_seconds": timeout}
    return state, {"REDIS_URL": server.url}
