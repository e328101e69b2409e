"""Budgets in money: the request that crosses the budget is the last one admitted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from harness import GatewayProcess, RedisServer, Sim, Tenants, base_config, gateway

from gateway.config import PriceConfig
from gateway.pricing import cost_of
from gateway.quotas import token_kinds
from gateway.simulator import IDENTITY_HEADER

PRICES = {"currency": "EUR", "input": 2000.0, "output": 8000.0}  # per 1M: ~0.1 EUR a request
Backend = tuple[dict[str, object], dict[str, str]]


def _cost_of_one(sim_state: Any) -> float:
    """The cost of one 'hello budget' request, from what the simulator answers to it."""
    from gateway.simulator import _input_items, build_response

    usage = build_response({}, _input_items({"input": "hello budget"}))["usage"]
    return cost_of(PriceConfig(**PRICES), None, token_kinds(usage)).amount  # type: ignore[arg-type]


def _cfg(sim: Sim, tenants: Tenants, budget: float, **extra: Any) -> dict[str, Any]:
    cfg = base_config({"swc": sim}, tenants, prices={"gpt-4.1": PRICES}, **extra)
    cfg["tenants"]["team-a"]["budgets"] = {"currency": "EUR", "per_day": budget, "warn_at": 0.5}
    cfg["tenants"]["team-a"]["models"] = ["gpt-4.1"]
    return cfg


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/openai/v1/", api_key=key, max_retries=2)


def test_money_budget_is_exact(identity: Sim, tenants: Tenants, backend: Backend) -> None:
    state, env = backend
    cost = _cost_of_one(identity.state)
    cfg = _cfg(identity, tenants, round(cost * 2.5, 6), state=state)
    key = tenants.key("team-a")
    with gateway(cfg, env) as gw:
        client = _client(gw.url, key)
        for _ in range(3):  # 0 → c → 2c spent at admission: all under 2.5c
            client.responses.create(model="gpt-4.1", input="hello budget")
        with pytest.raises(openai.RateLimitError) as info:
            client.responses.create(model="gpt-4.1", input="hello budget")
        metrics = httpx.get(gw.url + "/metrics").text
    assert info.value.code == "insufficient_quota"
    assert "EUR" in info.value.message and "resets in" in info.value.message
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(identity.state.api_requests()) == 3  # the client did not retry the refusal
    warned = re.search(
        r'gateway_budget_warnings_total\{model="",period="day",tenant="team-a"\} (\S+)', metrics
    )
    assert warned and float(warned.group(1)) == 1.0  # crossed 50 % once
    assert 'gateway_quota_refusals_total{reason="budget_per_day",tenant="team-a"} 1.0' in metrics


def test_money_budget_across_two_replicas(
    sim: Sim, tenants: Tenants, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.flush()
    cost = _cost_of_one(sim.state)
    cfg = _cfg(
        sim, tenants, round(cost * 4.5, 6), state={"backend": "redis", "url_env": "REDIS_URL"}
    )
    env = {
        "REDIS_URL": redis_server.url,
        "IDENTITY_ENDPOINT": f"{sim.url}/msi/token",
        "IDENTITY_HEADER": IDENTITY_HEADER,
    }
    key = tenants.key("team-a")
    replicas = [GatewayProcess(cfg, str(tmp_path), env).start() for _ in range(2)]
    try:
        clients = [_client(r.url, key) for r in replicas]
        for n in range(5):  # alternating replicas; the 5th crosses 4.5c and is the last in
            clients[n % 2].responses.create(model="gpt-4.1", input="hello budget")
        for client in clients:
            with pytest.raises(openai.RateLimitError) as info:
                client.responses.create(model="gpt-4.1", input="hello budget")
            assert info.value.code == "insufficient_quota"
    finally:
        for r in replicas:
            r.stop()
    assert len(sim.state.api_requests()) == 5


def test_budget_config_is_validated(identity: Sim, tenants: Tenants) -> None:
    from gateway.config import ConfigError, parse_config

    cfg = _cfg(identity, tenants, 10.0)
    cfg["tenants"]["team-a"]["budgets"]["currency"] = "USD"
    cfg["tenants"]["team-a"]["budgets"]["models"] = {"ghost": {"per_month": 5}}
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, {})
    assert "tenants.team-a.budgets.currency: USD differs from prices.gpt-4.1.currency EUR" in str(
        info.value
    )
    assert "tenants.team-a.budgets.models.ghost: unknown model" in str(info.value)


def test_budgets_are_exposed_for_the_dashboard(identity: Sim, tenants: Tenants) -> None:
    cfg = _cfg(identity, tenants, 12.5)
    cfg["tenants"]["team-a"]["budgets"]["models"] = {"gpt-4.1": {"per_month": 100}}
    with gateway(cfg) as gw:
        text = httpx.get(gw.url + "/metrics").text
    assert 'gateway_budget{currency="EUR",model="",period="day",tenant="team-a"} 12.5' in text
    assert (
        'gateway_budget{currency="EUR",model="gpt-4.1",period="month",tenant="team-a"} 100.0'
        in text
    )
