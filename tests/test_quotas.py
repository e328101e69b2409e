"""Quotas on each state backend: rates, budgets, concurrency, tool policy, key expiry."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants, base_config, gateway

Backend = tuple[dict[str, object], dict[str, str]]


def _gw(
    sim: Sim, tenants: Tenants, backend: Backend, **quotas: Any
) -> AbstractContextManager[Server]:
    state, env = backend
    cfg = base_config({"swc": sim}, tenants, state=state)
    cfg["tenants"]["team-a"]["quotas"] = quotas
    return gateway(cfg, env)


def _post(
    gw: Server, key: str, body: dict[str, Any] | None = None, **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/openai/v1/responses",
        json=body or {"model": "gpt-4.1", "input": "one two three"},
        headers={"api-key": key, **headers},
        timeout=20,
    )


def test_requests_per_minute_is_exact(identity: Sim, tenants: Tenants, backend: Backend) -> None:
    key = tenants.key("team-a")
    with _gw(identity, tenants, backend, requests_per_minute=5) as gw:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: _post(gw, key), range(16)))
        other = _post(gw, tenants.key("team-b"))  # another tenant is not affected
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 5 + [429] * 11
    assert other.status_code == 200
    refused = next(r for r in results if r.status_code == 429)
    err = refused.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "requests_per_minute" in err["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 13
    assert 0 < int(refused.headers["retry-after-ms"]) <= 12000
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in refused.headers
    ok = next(r for r in results if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "5"
    assert int(ok.headers["x-ratelimit-remaining-requests"]) in range(5)
    assert len(identity.state.api_requests()) == 6


def test_daily_budget_from_json_and_stream_usage(
    identity: Sim, tenants: Tenants, backend: Backend
) -> None:
    key = tenants.key("team-a")
    with _gw(identity, tenants, backend, tokens_per_day=40, tokens_per_minute=100000) as gw:
        first = _post(gw, key)
        used = first.json()["usage"]["total_tokens"]
        assert first.headers["x-ratelimit-limit-tokens"] == "100000"
        client = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=2)
        with client.responses.stream(model="gpt-4.1", input="one two three") as s:
            final = s.get_final_response()
        assert final.usage is not None
        used += final.usage.total_tokens
        while used < 40:
            r = _post(gw, key)
            assert r.status_code == 200
            used += r.json()["usage"]["total_tokens"]
        before = len(identity.state.api_requests())
        refused = _post(gw, key)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "insufficient_quota"
        assert refused.headers["x-should-retry"] == "false"
        assert int(refused.headers["retry-after"]) > 0
        # the real client does not retry a spent budget
        with pytest.raises(openai.RateLimitError) as info:
            client.responses.create(model="gpt-4.1", input="x")
        assert info.value.code == "insufficient_quota"
        metrics = httpx.get(gw.url + "/metrics").text
    assert len(identity.state.api_requests()) == before
    line = 'gateway_quota_refusals_total{reason="tokens_per_day",tenant="team-a"} 2.0'
    assert line in metrics


def test_tokens_per_minute_refuses_once_spent(
    identity: Sim, tenants: Tenants, backend: Backend
) -> None:
    key = tenants.key("team-a")
    with _gw(identity, tenants, backend, tokens_per_minute=10) as gw:
        assert _post(gw, key).status_code == 200  # ~13 tokens: the bucket goes into debt
        r = _post(gw, key)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "tokens_per_minute" in r.json()["error"]["message"]
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert float(r.headers["retry-after-ms"]) > 1000


def test_concurrency_released_on_complete_error_and_disconnect(
    identity: Sim, tenants: Tenants, backend: Backend
) -> None:
    key = tenants.key("team-a")
    slow = {"model": "gpt-4.1", "input": "a b c d e f", "stream": True}
    with _gw(identity, tenants, backend, max_concurrent_requests=1) as gw:
        url = f"{gw.url}/openai/v1/responses"
        h = {"api-key": key, "x-sim-delay": "0.05"}
        with httpx.stream("POST", url, json=slow, headers=h, timeout=20) as r:
            chunks = r.iter_raw()
            assert next(chunks)
            busy = _post(gw, key)
            assert busy.status_code == 429
            assert "max_concurrent_requests" in busy.json()["error"]["message"]
            assert b"response.completed" in b"".join(chunks)  # stream completes
        assert _post(gw, key).status_code == 200
        assert _post(gw, key, **{"x-sim-status": "500"}).status_code == 500  # upstream error
        assert _post(gw, key).status_code == 200
        with httpx.stream("POST", url, json=slow, headers=h, timeout=20) as r:
            chunks = r.iter_raw()
            next(chunks)
            assert _post(gw, key).status_code == 429
        # the client disconnected mid-stream
        ok = None
        for _ in range(40):
            ok = _post(gw, key)
            if ok.status_code == 200:
                break
        assert ok is not None and ok.status_code == 200
        text = httpx.get(gw.url + "/metrics").text
    # the cut stream was charged an estimate
    assert 'gateway_estimated_tokens_total{model="gpt-4.1",tenant="team-a"}' in text


def test_per_model_quota(identity: Sim, tenants: Tenants, backend: Backend) -> None:
    state, env = backend
    cfg = base_config({"swc": identity}, tenants, state=state)
    cfg["tenants"]["team-a"]["model_quotas"] = {"gpt-4o-mini": {"requests_per_minute": 1}}
    with gateway(cfg, env) as gw:
        key = tenants.key("team-a")
        mini = {"model": "gpt-4o-mini", "input": "x"}
        assert _post(gw, key, mini).status_code == 200
        assert _post(gw, key, mini).status_code == 429
        assert _post(gw, key).status_code == 200  # gpt-4.1 is not limited


def test_upstream_ratelimit_headers_are_replaced(identity: Sim, tenants: Tenants) -> None:
    with _gw(identity, tenants, ({"backend": "memory"}, {}), requests_per_minute=100) as gw:
        r = _post(gw, tenants.key("team-a"))
        b = _post(gw, tenants.key("team-b"))
    assert r.headers["x-ratelimit-limit-requests"] == "100"
    assert "x-ratelimit-remaining-tokens" not in r.headers  # upstream said 123456
    assert not any(k.startswith("x-ratelimit-") for k in b.headers)


def test_tool_policy(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants)
    cfg["tenants"]["team-a"]["tools"] = {"allowed": ["function", "web_search_preview"]}
    with gateway(cfg) as gw:
        key = tenants.key("team-a")
        fn = {"type": "function", "name": "f", "parameters": {"type": "object"}}
        ok = _post(gw, key, {"model": "gpt-4.1", "input": "x", "tools": [fn]})
        mcp = {"type": "mcp", "server_label": "s", "server_url": "https://mcp.example.com"}
        refused = _post(gw, key, {"model": "gpt-4.1", "input": "x", "tools": [fn, mcp]})
    assert ok.status_code == 200
    assert refused.status_code == 403
    err = refused.json()["error"]
    assert err["code"] == "tool_not_allowed" and "'mcp'" in err["message"]
    assert err["param"] == "tools[1].type"


def test_expired_key_refused_and_rotation(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants)
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    old_key = "gk-old-key-for-rotation-test"
    from gateway.keys import hash_key

    cfg["tenants"]["team-a"]["keys"].append(
        {"id": "team-a-old", "sha256": hash_key(old_key), "expires_at": past}
    )
    with gateway(cfg) as gw:
        r = _post(gw, old_key)
        new = _post(gw, tenants.key("team-a"))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "expired_api_key"
    assert "team-a-old" in r.json()["error"]["message"] and old_key not in r.text
    assert new.status_code == 200


def test_background_response_charged_once_when_usage_known(
    identity: Sim, tenants: Tenants, backend: Backend
) -> None:
    key = tenants.key("team-a")
    identity.state.background_seconds = 0.2
    body = {"model": "gpt-4.1", "input": "one two three", "background": True}
    direct = httpx.post(
        f"{identity.url}/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "one two three"},
        headers={"api-key": "sim-api-key"},
    )
    per_response = direct.json()["usage"]["total_tokens"]
    with _gw(identity, tenants, backend, tokens_per_day=int(per_response * 1.5)) as gw:
        queued = _post(gw, key, body)
        assert queued.status_code == 200 and queued.json()["status"] == "queued"
        rid = queued.json()["id"]
        time.sleep(0.3)
        for _ in range(3):  # retrieves of the finished response: charged on the first only
            got = httpx.get(f"{gw.url}/openai/v1/responses/{rid}", headers={"api-key": key})
            assert got.json()["status"] == "completed"
        assert _post(gw, key).status_code == 200  # 1 charge < budget: still admitted
        refused = _post(gw, key)  # now 2 charges > budget
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
