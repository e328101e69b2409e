"""Operations: metrics after real traffic, access log, readiness, SIGTERM drain, hot reload."""

from __future__ import annotations

import copy
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from harness import GatewayProcess, Sim, Tenants, base_config, gateway
from prometheus_client.parser import text_string_to_metric_families

from gateway.simulator import IDENTITY_HEADER


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_after_real_traffic(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants)
    cfg["tenants"]["team-b"]["quotas"] = {"requests_per_minute": 1}
    with gateway(cfg) as gw:
        a, b = tenants.key("team-a"), tenants.key("team-b")
        url = f"{gw.url}/openai/v1/responses"
        ok = httpx.post(url, json={"model": "gpt-4.1", "input": "a b"}, headers={"api-key": a})
        usage = ok.json()["usage"]
        with httpx.stream(
            "POST",
            url,
            json={"model": "gpt-4.1", "input": "c", "stream": True},
            headers={"api-key": a},
        ) as r:
            r.read()
        httpx.post(url, json={"model": "gpt-4.1", "input": "x"}, headers={"api-key": b})
        refused = httpx.post(url, json={"model": "gpt-4.1", "input": "x"}, headers={"api-key": b})
        failed = httpx.post(
            url,
            json={"model": "gpt-4.1", "input": "x"},
            headers={"api-key": a, "x-sim-status": "503"},
        )
        httpx.post(url, json={"model": "gpt-4.1"}, headers={"api-key": "gk-unknown-key"})
        httpx.post(url, json={"model": "made-up-model-123", "input": "x"}, headers={"api-key": a})
        text = httpx.get(gw.url + "/metrics").text
    assert refused.status_code == 429 and failed.status_code == 503
    m = samples(text)
    assert (
        value(
            m,
            "gateway_requests_total",
            transport="http",
            tenant="team-a",
            model="gpt-4.1",
            operation="create",
            status="200",
        )
        == 2
    )
    assert (
        value(
            m,
            "gateway_requests_total",
            transport="http",
            tenant="team-b",
            model="gpt-4.1",
            operation="create",
            status="429",
        )
        == 1
    )
    assert (
        value(
            m,
            "gateway_requests_total",
            transport="http",
            tenant="other",
            model="other",
            operation="create",
            status="401",
        )
        == 1
    )
    assert (
        value(
            m,
            "gateway_requests_total",
            transport="http",
            tenant="team-a",
            model="other",
            operation="create",
            status="403",
        )
        == 1
    )
    assert (
        value(m, "gateway_quota_refusals_total", tenant="team-b", reason="requests_per_minute") == 1
    )
    assert (
        value(
            m, "gateway_upstream_errors_total", resource="swc", region="swedencentral", status="503"
        )
        == 1
    )
    assert (
        value(m, "gateway_tokens_total", tenant="team-a", model="gpt-4.1", kind="input")
        >= usage["input_tokens"]
    )
    assert (
        value(
            m,
            "gateway_time_to_first_byte_seconds_count",
            tenant="team-a",
            model="gpt-4.1",
            stream="true",
        )
        == 1
    )
    assert (
        value(
            m,
            "gateway_request_duration_seconds_count",
            tenant="team-a",
            model="gpt-4.1",
            operation="create",
            stream="false",
        )
        == 2
    )
    assert value(m, "gateway_entra_token_fetches_total", result="success") == 1
    assert value(m, "gateway_inflight_requests") == 0  # all answered; scrapes are not counted
    assert value(m, "gateway_active_streams") == 0
    assert (
        value(
            m,
            "gen_ai_client_token_usage_count",
            gen_ai_operation_name="create",
            gen_ai_request_model="gpt-4.1",
            gen_ai_token_type="input",
        )
        == 3
    )
    for secret in (a, b, "gk-unknown-key", identity.state.tokens_issued[0], "made-up-model-123"):
        assert secret not in text


@pytest.fixture
def procs(tmp_path: Path, identity: Sim) -> Any:
    started: list[GatewayProcess] = []

    def start(cfg: dict[str, Any], log_level: str = "WARNING") -> GatewayProcess:
        env = {"IDENTITY_ENDPOINT": f"{identity.url}/msi/token", "IDENTITY_HEADER": IDENTITY_HEADER}
        p = GatewayProcess(cfg, str(tmp_path), env, log_level).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def test_access_log_is_json_without_secrets(identity: Sim, tenants: Tenants, procs: Any) -> None:
    gw = procs(base_config({"swc": identity}, tenants), "INFO")
    key = tenants.key("team-a")
    url = f"{gw.url}/openai/v1/responses"
    r = httpx.post(
        url,
        json={"model": "gpt-4.1", "input": "hello secret body"},
        headers={"api-key": key, "x-request-id": "req-abc"},
    )
    httpx.post(url, json={"model": "gpt-4.1"}, headers={"authorization": "Bearer gk-wrong-one"})
    assert r.status_code == 200
    err = gw.stop()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [rec for rec in lines if rec["logger"] == "gateway.access"]
    first = next(rec for rec in access if rec["request_id"] == "req-abc")
    assert first["tenant"] == "team-a" and first["key_id"] == "team-a-key"
    assert first["deployment"] == "dep-41-swc" and first["region"] == "swedencentral"
    assert first["status"] == 200 and first["total_tokens"] == r.json()["usage"]["total_tokens"]
    assert first["upstream_request_id"].startswith("sim_") and first["stream"] is False
    assert any(rec["status"] == 401 for rec in access)
    for secret in (key, "gk-wrong-one", "hello secret body", identity.state.tokens_issued[0]):
        assert secret not in err


def test_readiness_reports_credential_failure(
    sim: Sim, tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{sim.url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "wrong")
    with gateway(base_config({"swc": sim}, tenants)) as gw:
        r = httpx.get(gw.url + "/readyz", timeout=20)
        fetches = sum(1 for q in sim.state.requests if q.path == "/msi/token")
        httpx.get(gw.url + "/readyz", timeout=20)  # cached: no second fetch within 10 s
        again = sum(1 for q in sim.state.requests if q.path == "/msi/token")
        assert httpx.get(gw.url + "/healthz").status_code == 200
    assert r.status_code == 503 and "credential" in r.json()["problems"][0]
    assert fetches >= 1 and again == fetches


def test_sigterm_drains_open_stream(identity: Sim, tenants: Tenants, procs: Any) -> None:
    cfg = base_config({"swc": identity}, tenants, server={"shutdown_grace_seconds": 10})
    gw = procs(cfg)
    key = tenants.key("team-a")
    body = {"model": "gpt-4.1", "input": " ".join(["w"] * 20), "stream": True}
    with httpx.stream(
        "POST",
        f"{gw.url}/openai/v1/responses",
        json=body,
        headers={"api-key": key, "x-sim-delay": "0.1"},
        timeout=30,
    ) as r:
        chunks = r.iter_raw()
        received = next(chunks)
        started = time.monotonic()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):
            httpx.post(
                f"{gw.url}/openai/v1/responses",
                json={"model": "gpt-4.1", "input": "x"},
                headers={"api-key": key},
            )
        received += b"".join(chunks)
    assert b"response.completed" in received
    gw.proc.wait(10)
    assert time.monotonic() - started < 10
    # uvicorn re-raises the signal after a graceful shutdown: "killed by SIGTERM" is clean
    assert gw.proc.returncode in (0, -signal.SIGTERM)


def test_reload_applies_valid_and_keeps_old_on_invalid(
    identity: Sim, tenants: Tenants, procs: Any, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    cfg = base_config(
        {"swc": identity},
        tenants,
        server={"reload_interval_seconds": 0},
        audit={"path": str(audit)},
    )
    gw = procs(cfg)
    a, b = tenants.key("team-a"), tenants.key("team-b")
    url = f"{gw.url}/openai/v1/responses"

    def status(key: str, model: str = "gpt-4.1") -> int:
        return httpx.post(
            url, json={"model": model, "input": "x"}, headers={"api-key": key}
        ).status_code

    assert status(b, "o3") == 403
    changed = copy.deepcopy(cfg)
    changed["tenants"]["team-b"]["models"] = ["gpt-4.1", "o3"]
    changed["tenants"]["team-a"]["keys"] = []  # key revoked
    gw.write_config(changed)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while status(b, "o3") != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(b, "o3") == 200
    assert status(a) == 401
    gw.write_config("tenants: [this is: not valid")
    gw.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert status(b, "o3") == 200  # the old config keeps serving
    # A pasted second team-a block (YAML keeps the last copy silently): refused too.
    # If YAML kept the last copy, the second block would give team-a's key back.
    entry = tenants.entry("team-a")
    second = f'  team-a:\n    keys: [{{id: {entry["id"]}, sha256: "{entry["sha256"]}"}}]\n'
    second += "    models: [gpt-4.1]\n"
    text = yaml.safe_dump(changed).replace("  team-b:", second + "  team-b:", 1)
    gw.write_config(text)
    gw.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert status(b, "o3") == 200 and status(a) == 401  # still the applied config
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_config_reloads_total{result="applied"} 1.0' in metrics
    assert 'gateway_config_reloads_total{result="rejected"} 2.0' in metrics
    # Each outcome is a record in the audit chain, with what changed or why it was refused.
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    reloads = [r for r in records if r["event"].startswith("config.")]
    assert [r["event"] for r in reloads] == [
        "config.reloaded",
        "config.rejected",
        "config.rejected",
    ]
    assert reloads[0]["actor"] == "sighup"
    assert reloads[0]["keys_removed"] == ["team-a/team-a-key"] and reloads[0]["keys_added"] == []
    # Every changed leaf with its old and new value; keys by id, never their hashes.
    diff = {c["path"]: (c["from"], c["to"]) for c in reloads[0]["changed"]}
    assert diff == {
        "tenants.team-b.models": (["gpt-4.1"], ["gpt-4.1", "o3"]),
        "tenants.team-a.keys": (["team-a-key"], []),
    }
    assert "not valid YAML" in reloads[1]["reason"]
    assert "duplicate key 'team-a'" in reloads[2]["reason"]
    assert tenants.key("team-a") not in audit.read_text()


def test_reload_interval_changes_apply_on_reload(
    identity: Sim, tenants: Tenants, procs: Any
) -> None:
    """A reload that sets reload_interval_seconds to 0 stops the polling (only SIGHUP
    reloads from then on); one that sets a number starts it."""
    cfg = base_config({"swc": identity}, tenants, server={"reload_interval_seconds": 0.1})
    gw = procs(cfg)
    url = f"{gw.url}/openai/v1/responses"
    key = tenants.key("team-b")

    def o3() -> int:
        body = {"model": "o3", "input": "x"}
        return httpx.post(url, json=body, headers={"api-key": key}).status_code

    def wait_for(status: int) -> None:
        deadline = time.monotonic() + 5
        while o3() != status:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    changed = copy.deepcopy(cfg)
    changed["tenants"]["team-b"]["models"] = ["gpt-4.1", "o3"]
    changed["server"]["reload_interval_seconds"] = 0
    gw.write_config(changed)
    wait_for(200)  # polled at 0.1 s
    changed["tenants"]["team-b"]["models"] = ["gpt-4.1"]
    gw.write_config(changed)
    time.sleep(0.6)
    assert o3() == 200  # no polling any more
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(403)


def test_reload_on_file_change_and_in_flight_stream(
    identity: Sim, tenants: Tenants, procs: Any
) -> None:
    cfg = base_config({"swc": identity}, tenants, server={"reload_interval_seconds": 0.2})
    gw = procs(cfg)
    key = tenants.key("team-a")
    body = {"model": "gpt-4.1", "input": " ".join(["w"] * 10), "stream": True}
    with httpx.stream(
        "POST",
        f"{gw.url}/openai/v1/responses",
        json=body,
        headers={"api-key": key, "x-sim-delay": "0.1"},
        timeout=30,
    ) as r:
        chunks = r.iter_raw()
        received = next(chunks)
        revoked = copy.deepcopy(cfg)
        revoked["tenants"]["team-a"]["keys"] = []
        gw.write_config(revoked)  # as a ConfigMap update would
        time.sleep(0.6)
        refused = httpx.post(
            f"{gw.url}/openai/v1/responses",
            json={"model": "gpt-4.1", "input": "x"},
            headers={"api-key": key},
        )
        received += b"".join(chunks)
    assert refused.status_code == 401
    assert b"response.completed" in received  # the in-flight stream was not cut


def test_metrics_on_separate_port(identity: Sim, tenants: Tenants, procs: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = procs(base_config({"swc": identity}, tenants, metrics={"port": port, "host": "127.0.0.1"}))
    assert httpx.get(gw.url + "/metrics").status_code == 404
    assert "gateway_requests_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
