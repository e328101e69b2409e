"""Every refusal: right status, OpenAI-shaped body, and no secret in any log line."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants, base_config, gateway

from gateway.logs import JsonFormatter


def _post(gw: Server, body: Any, key: str | None, **kw: Any) -> httpx.Response:
    headers = {"api-key": key} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{gw.url}/openai/v1/responses", content=body, headers=headers, **kw)
    return httpx.post(f"{gw.url}/openai/v1/responses", json=body, headers=headers, **kw)


def _assert_error(r: httpx.Response, status: int, code: str, mentions: str = "") -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    assert mentions in err["message"]
    assert r.headers["x-request-id"]


def test_refusals(gw: Server, sim: Sim, tenants: Tenants, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = tenants.key("team-a")
    ok = {"model": "gpt-4.1", "input": "hi"}
    _assert_error(_post(gw, ok, None), 401, "missing_api_key", "api-key")
    _assert_error(_post(gw, ok, "gk-wrong"), 401, "invalid_api_key")
    _assert_error(_post(gw, b"{not json", key), 400, "invalid_json", "line 1 column 2")
    _assert_error(_post(gw, b"[1, 2]", key), 400, "invalid_json", "JSON object")
    _assert_error(_post(gw, {"input": "hi"}, key), 400, "missing_required_parameter", "model")
    _assert_error(_post(gw, {"model": "gpt-4o-nope", "input": "hi"}, key), 404, "model_not_found")
    _assert_error(_post(gw, {"model": "o3", "input": "hi"}, key), 403, "model_not_allowed", "o3")
    r = httpx.get(f"{gw.url}/openai/v1/chat/completions", headers={"api-key": key})
    _assert_error(r, 405, "method_not_allowed", "GET")
    r = httpx.get(f"{gw.url}/openai/v1/assistants", headers={"api-key": key})
    _assert_error(r, 404, "unknown_path", "/openai/v1/assistants")
    r = httpx.put(f"{gw.url}/openai/v1/responses", headers={"api-key": key})
    _assert_error(r, 405, "method_not_allowed")
    assert sim.state.api_requests() == []
    # Bearer form works too, and the key never appears in logs.
    r = _post(gw, ok, None, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200
    token = sim.state.tokens_issued[0]
    lines = [JsonFormatter().format(rec) for rec in caplog.records]
    assert any(json.loads(line).get("operation") == "create" for line in lines)
    for line in lines:
        assert key not in line and token not in line and "gk-wrong" not in line


def test_sdk_sees_typed_errors(gw: Server, tenants: Tenants) -> None:
    client = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key="gk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.responses.create(model="gpt-4.1", input="x")
    assert info.value.code == "invalid_api_key"
    assert info.value.request_id


def test_residency_conflict(identity: Sim, sim2: Sim, tenants: Tenants) -> None:
    cfg = base_config({"fr": sim2}, tenants)
    cfg["resources"]["swc"] = {"endpoint": identity.url, "region": "swedencentral"}
    cfg["tenants"]["team-a"]["regions"] = ["swedencentral"]
    # A glob may match models outside the pin (refused when used); an exact entry may not.
    cfg["tenants"]["team-a"]["models"] = ["gpt-4*"]
    with gateway(cfg) as gw:
        r = _post(gw, {"model": "gpt-4.1", "input": "x"}, tenants.key("team-a"))
    _assert_error(r, 403, "region_not_allowed", "swedencentral")
    assert "residency" in r.json()["error"]["message"]
    assert sim2.state.api_requests() == []


def test_oversized_body(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants, server={"max_body_bytes": 1000})
    with gateway(cfg) as gw:
        big = {"model": "gpt-4.1", "input": "x" * 2000}
        _assert_error(_post(gw, big, tenants.key("team-a")), 413, "request_too_large", "1000")

        def chunks() -> Any:  # no content-length: the limit holds while streaming in
            yield b'{"model": "gpt-4.1", "input": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'

        r = httpx.post(
            f"{gw.url}/openai/v1/responses",
            content=chunks(),
            headers={"api-key": tenants.key("team-a")},
        )
        _assert_error(r, 413, "request_too_large")
    assert identity.state.api_requests() == []


def test_upstream_down(identity: Sim, tenants: Tenants) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = base_config({"swc": identity}, tenants)
    cfg["resources"]["swc"]["endpoint"] = f"http://127.0.0.1:{dead}"
    with gateway(cfg) as gw:
        r = _post(gw, {"model": "gpt-4.1", "input": "x"}, tenants.key("team-a"))
    _assert_error(r, 502, "upstream_connect_error", "upstream")
    # Finding 12: a tenant never learns the gateway's resources or endpoints.
    assert "swc" not in r.text and str(dead) not in r.text


def test_upstream_timeout(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants)
    cfg["upstream"]["read_timeout"] = 0.3
    with gateway(cfg) as gw:
        r = _post(
            gw,
            {"model": "gpt-4.1", "input": "x"},
            tenants.key("team-a"),
            headers={"x-sim-hang": "1"},
        )
    _assert_error(r, 504, "upstream_timeout")


def test_upstream_errors_pass_through(gw: Server, tenants: Tenants) -> None:
    r = _post(
        gw,
        {"model": "gpt-4.1", "input": "x"},
        tenants.key("team-a"),
        headers={"x-sim-status": "400"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Simulated upstream error 400."


def test_credential_failure_is_503(
    sim: Sim, tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{sim.url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "wrong-header")
    with gateway(base_config({"swc": sim}, tenants)) as gw:
        r = _post(gw, {"model": "gpt-4.1", "input": "x"}, tenants.key("team-a"), timeout=20)
    _assert_error(r, 503, "credential_unavailable", "Entra")
    assert sim.state.api_requests() == []


def test_wrong_method_on_a_gateway_endpoint(gw: Server) -> None:
    r = httpx.post(gw.url + "/healthz")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed" and r.headers["x-request-id"]
