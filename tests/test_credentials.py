"""Entra tokens: azure-identity's real managed-identity flow, caching and refresh."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import httpx
import pytest
from harness import Server, Sim, Tenants

from gateway.credentials import TokenProvider
from gateway.errors import CredentialError


def _create(gw: Server, key: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "x"},
        headers={"api-key": key},
        timeout=20,
    )


def _token_fetches(sim: Sim) -> int:
    return sum(1 for r in sim.state.requests if r.path == "/msi/token")


def test_upstream_gets_entra_token_not_gateway_key(gw: Server, sim: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    assert _create(gw, key).status_code == 200
    fetch = next(r for r in sim.state.requests if r.path == "/msi/token")
    assert "api-version=2019-08-01" in fetch.query
    assert "resource=https://cognitiveservices.azure.com" in fetch.query
    sent = sim.state.api_requests()[-1]
    assert sent.headers["authorization"] == f"Bearer {sim.state.tokens_issued[0]}"
    assert "api-key" not in sent.headers
    assert all(key not in v for v in sent.headers.values())
    assert key.encode() not in sent.body


def test_concurrent_requests_share_one_fetch(gw: Server, sim: Sim, tenants: Tenants) -> None:
    sim.state.token_delay = 0.3
    key = tenants.key("team-a")
    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: _create(gw, key).status_code, range(50)))
    assert statuses == [200] * 50
    assert _token_fetches(sim) == 1


def test_token_near_expiry_is_refreshed(gw: Server, sim: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    sim.state.token_expires_in = 200  # inside the 300 s refresh margin
    assert _create(gw, key).status_code == 200
    sim.state.token_expires_in = 3600
    assert _create(gw, key).status_code == 200
    assert _create(gw, key).status_code == 200
    assert _token_fetches(sim) == 2
    last = sim.state.api_requests()[-1]
    assert last.headers["authorization"] == f"Bearer {sim.state.tokens_issued[1]}"


class _Tok(NamedTuple):
    token: str
    expires_on: int


class _FakeCredential:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.hang = 0.0

    def get_token(self, *scopes: str) -> Any:
        self.calls += 1
        if self.hang:
            time.sleep(self.hang)
        if self.fail:
            raise RuntimeError("identity endpoint down")
        return _Tok(f"t{self.calls}", int(clock.now + 1000))


class _Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


clock = _Clock()


def test_failed_refresh_serves_still_valid_token() -> None:
    cred = _FakeCredential()
    provider = TokenProvider(cred, margin=300, clock=clock)
    assert asyncio.run(provider.token("s")) == "t1"
    clock.now += 800  # 200 s left: inside the margin, refresh is due
    cred.fail = True
    assert asyncio.run(provider.token("s")) == "t1"
    clock.now += 190  # 10 s left: no longer usable
    with pytest.raises(CredentialError):
        asyncio.run(provider.token("s"))


def test_hung_credential_times_out() -> None:
    cred = _FakeCredential()
    cred.hang = 1.0
    provider = TokenProvider(cred, timeout=0.1, clock=clock)

    async def timed() -> float:
        started = time.monotonic()
        with pytest.raises(CredentialError, match="timed out"):
            await provider.token("s")
        return time.monotonic() - started

    assert asyncio.run(timed()) < 0.9  # the request is answered; the thread ends on its own


def test_api_key_resource_gets_its_own_key(sim: Sim, tenants: Tenants) -> None:
    from harness import base_config, gateway

    cfg = base_config({"swc": sim}, tenants)
    cfg["resources"]["swc"].update(auth="api_key", api_key_env="AOAI_SWC_KEY")
    with gateway(cfg, {"AOAI_SWC_KEY": "sim-api-key"}) as gw:
        assert _create(gw, tenants.key("team-a")).status_code == 200
    sent = sim.state.api_requests()[-1].headers
    assert sent["api-key"] == "sim-api-key" and "authorization" not in sent
    assert _token_fetches(sim) == 0
