"""Cost from the price table times Azure's usage, on every exchange; estimates flagged."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx
import pytest
from harness import Sim, Tenants, base_config, gateway

from gateway.config import ConfigError, PriceConfig, parse_config
from gateway.logs import JsonFormatter
from gateway.pricing import cost_of, price_tokens

PRICES = {"currency": "EUR", "input": 2.0, "cached_input": 0.5, "output": 8.0, "reasoning": 10.0}
URL = "/openai/v1/responses"


def expected(usage: dict[str, Any]) -> float:
    cached = usage["input_tokens_details"]["cached_tokens"]
    reasoning = usage["output_tokens_details"]["reasoning_tokens"]
    return (
        (usage["input_tokens"] - cached) * 2.0
        + cached * 0.5
        + (usage["output_tokens"] - reasoning) * 8.0
        + reasoning * 10.0
    ) / 1e6


def test_price_tokens() -> None:
    p = PriceConfig(**PRICES)  # type: ignore[arg-type]
    assert price_tokens(p, 1_000_000, 250_000, 500_000, 100_000) == pytest.approx(
        0.75 * 2.0 + 0.25 * 0.5 + 0.4 * 8.0 + 0.1 * 10.0
    )
    plain = PriceConfig(currency="USD", input=1.0, output=4.0)
    assert price_tokens(plain, 10, 4, 6, 3) == pytest.approx((10 * 1.0 + 6 * 4.0) / 1e6)
    ptu = PriceConfig(
        currency="EUR", input=2, output=8, resources={"ptu": {"input": 0, "output": 0}}
    )  # type: ignore[arg-type]
    assert cost_of(ptu, "ptu", {"input": 9, "cached": 0, "output": 9, "reasoning": 0}).amount == 0
    cut = cost_of(ptu, "payg", {"input": 100, "cached": 0, "output": 10, "reasoning": 0}, True)
    assert cut.estimated and cut.amount == pytest.approx((100 * 2 + 10 * 8) / 1e6)


def test_realtime_audio_tokens_have_their_own_prices() -> None:
    from gateway.quotas import token_kinds

    usage = {  # Realtime's response.done usage
        "total_tokens": 30,
        "input_tokens": 12,
        "output_tokens": 18,
        "input_token_details": {"text_tokens": 4, "audio_tokens": 8, "cached_tokens": 2},
        "output_token_details": {"text_tokens": 6, "audio_tokens": 12},
    }
    kinds = token_kinds(usage)
    assert (kinds["audio_input"], kinds["audio_output"], kinds["cached"]) == (8, 12, 2)
    p = PriceConfig(
        currency="EUR", input=1, cached_input=0.5, output=4, audio_input=10, audio_output=20
    )  # type: ignore[arg-type]
    expected = (2 * 1 + 2 * 0.5 + 8 * 10 + 6 * 4 + 12 * 20) / 1e6
    assert cost_of(p, None, kinds).amount == pytest.approx(expected)
    # Without audio prices, audio tokens cost what text does.
    plain = PriceConfig(currency="EUR", input=1, output=4)  # type: ignore[arg-type]
    assert cost_of(plain, None, kinds).amount == pytest.approx((10 * 1 + 2 * 1 + 18 * 4) / 1e6)


def test_price_table_is_validated(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants)
    cfg["prices"] = {
        "nope": PRICES,
        "gpt-4.1": {**PRICES, "resources": {"ghost": {"input": 0, "output": 0}}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, {})
    assert "prices.nope: unknown model" in str(info.value)
    assert "prices.gpt-4.1.resources.ghost: unknown resource" in str(info.value)
    cfg["prices"] = {"gpt-4.1": {**PRICES, "currency": "euro"}}
    with pytest.raises(ConfigError, match=re.escape("prices.gpt-4.1.currency")):
        parse_config(cfg, {})


def test_cost_of_json_and_streamed_responses(
    identity: Sim, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    cfg = base_config({"swc": identity}, tenants, prices={"gpt-4.1": PRICES})
    key = tenants.key("team-a")
    details = {"x-sim-cached-tokens": "3", "x-sim-reasoning-tokens": "5", "api-key": key}
    usages = []
    with gateway(cfg) as gw, httpx.Client(base_url=gw.url) as client:
        r = client.post(URL, json={"model": "gpt-4.1", "input": "price me"}, headers=details)
        usages.append(r.json()["usage"])
        r = client.post(
            URL, json={"model": "gpt-4.1", "input": "me too", "stream": True}, headers=details
        )
        done = [
            json.loads(line[6:]) for line in r.text.splitlines() if '"response.completed"' in line
        ]
        usages.append(done[0]["response"]["usage"])
        # a stream the client cuts: priced from the estimate, flagged
        with client.stream(
            "POST",
            URL,
            json={"model": "gpt-4.1", "input": "cut", "stream": True},
            headers={**details, "x-sim-delay": "0.2"},
        ) as s:
            next(s.iter_raw())
        metrics = ""
        for _ in range(50):
            metrics = client.get("/metrics").text
            if "gateway_estimated_tokens_total{" in metrics:
                break
    lines = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records]
    priced = [line for line in lines if line.get("operation") == "create"]
    assert len(priced) == 3
    for line, usage in zip(priced[:2], usages, strict=True):
        assert usage["input_tokens_details"]["cached_tokens"] == 3
        assert usage["output_tokens_details"]["reasoning_tokens"] == 5
        assert line["currency"] == "EUR" and line["cost_estimated"] is False
        assert round(line["cost"], 8) == round(expected(usage), 8)
    assert priced[2]["cost_estimated"] is True and priced[2]["cost"] > 0
    total = float(
        re.search(
            r'gateway_cost_total\{currency="EUR",model="gpt-4.1",tenant="team-a"\} (\S+)', metrics
        ).group(1)
    )  # type: ignore[union-attr]
    assert round(total, 8) == round(sum(line["cost"] for line in priced), 8)
