"""MCP audit trail: records, redaction, durability before forwarding, chain, sinks, policy."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from harness import RedisServer, Server, Sim, Tenants, base_config, gateway

from gateway.audit_sinks import verify
from gateway.logs import JsonFormatter

HEADER_SECRET = "Bearer mcp-header-secret-123"
AUTH_SECRET = "oauth-secret-456"
ARG_SECRET = "sk-sim-argument-secret"  # the simulator puts it in mcp_call arguments


def mcp_tool(label: str = "docs", approval: str = "never", **extra: Any) -> dict[str, Any]:
    return {
        "type": "mcp",
        "server_label": label,
        "server_url": f"https://mcp.example.com/{label}",
        "require_approval": approval,
        "headers": {"Authorization": HEADER_SECRET, "X-Tenant": "t1"},
        "authorization": AUTH_SECRET,
        **extra,
    }


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "mcp-audit.jsonl"


@pytest.fixture
def agw(identity: Sim, tenants: Tenants, audit_path: Path) -> Iterator[Server]:
    cfg = base_config({"swc": identity}, tenants, audit={"path": str(audit_path)})
    with gateway(cfg) as server:
        yield server


def _client(gw: Server, tenants: Tenants) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0
    )


def test_json_response_records(agw: Server, audit_path: Path, tenants: Tenants) -> None:
    resp = _client(agw, tenants).responses.create(
        model="gpt-4.1",
        input="find docs",
        tools=[mcp_tool()],  # type: ignore[list-item]
    )
    recs = records(audit_path)
    assert [r["event"] for r in recs] == ["mcp.tool", "mcp.list_tools", "mcp.call"]
    tool, listed, call = recs
    assert tool["tenant"] == "team-a" and tool["key_id"] == "team-a-key"
    assert tool["server_label"] == "docs" and tool["server_url"] == "https://mcp.example.com/docs"
    assert tool["header_names"] == ["Authorization", "X-Tenant"] and tool["authorization_set"]
    assert tool["model"] == "gpt-4.1" and tool["resource"] == "swc"
    assert tool["deployment"] == "dep-41-swc" and tool["region"] == "swedencentral"
    assert listed["tools"] == ["search", "fetch"] and listed["response_id"] == resp.id
    assert call["name"] == "search" and call["output"] == "results for find docs"
    args = json.loads(call["arguments"])
    assert args == {"query": "find docs", "api_key": "[REDACTED]"}
    assert len({r["request_id"] for r in recs}) == 1


def test_stream_records(agw: Server, audit_path: Path, tenants: Tenants) -> None:
    client = _client(agw, tenants)
    with client.responses.stream(
        model="gpt-4.1",
        input="q",
        tools=[mcp_tool("wiki")],  # type: ignore[list-item]
    ) as s:
        final = s.get_final_response()
    recs = records(audit_path)
    assert [r["event"] for r in recs] == ["mcp.tool", "mcp.list_tools", "mcp.call"]
    assert all(r["response_id"] == final.id for r in recs[1:])


def test_approval_round_trip(agw: Server, audit_path: Path, tenants: Tenants) -> None:
    client = _client(agw, tenants)
    first = client.responses.create(
        model="gpt-4.1",
        input="delete prod",
        tools=[mcp_tool(approval="always")],  # type: ignore[list-item]
    )
    req = next(i for i in first.output if i.type == "mcp_approval_request")
    second = client.responses.create(
        model="gpt-4.1",
        previous_response_id=first.id,
        tools=[mcp_tool(approval="always")],  # type: ignore[list-item]
        input=[{"type": "mcp_approval_response", "approval_request_id": req.id, "approve": True}],
    )
    recs = records(audit_path)
    asked = next(r for r in recs if r["event"] == "mcp.approval_request")
    answered = next(r for r in recs if r["event"] == "mcp.approval")
    call = next(r for r in recs if r["event"] == "mcp.call")
    assert asked["item_id"] == req.id and asked["response_id"] == first.id
    assert answered["approval_request_id"] == req.id and answered["approve"] is True
    assert answered["previous_response_id"] == first.id
    assert call["approval_request_id"] == req.id and call["response_id"] == second.id


def test_secrets_appear_nowhere(
    agw: Server, audit_path: Path, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    client = _client(agw, tenants)
    client.responses.create(model="gpt-4.1", input="x", tools=[mcp_tool()])  # type: ignore[list-item]
    with client.responses.stream(model="gpt-4.1", input="y", tools=[mcp_tool()]) as s:  # type: ignore[list-item]
        s.get_final_response()
    blobs = [
        audit_path.read_bytes(),
        httpx.get(agw.url + "/metrics").content,
        "\n".join(JsonFormatter().format(r) for r in caplog.records).encode(),
    ]
    assert b"mcp.call" in blobs[0]
    for blob in blobs:
        for secret in (HEADER_SECRET, "mcp-header-secret-123", AUTH_SECRET, ARG_SECRET):
            assert secret.encode() not in blob


def test_request_record_is_on_disk_before_upstream(
    identity: Sim, tenants: Tenants, audit_path: Path
) -> None:
    seen: list[bool] = []

    def check(rec: Any) -> None:
        rid = rec.headers.get("x-request-id")
        text = audit_path.read_text() if audit_path.exists() else ""
        seen.append(f'"request_id":"{rid}"' in text and '"event":"mcp.tool"' in text)

    identity.state.on_request = check
    cfg = base_config({"swc": identity}, tenants, audit={"path": str(audit_path)})
    with gateway(cfg) as gw:
        _client(gw, tenants).responses.create(model="gpt-4.1", input="x", tools=[mcp_tool()])  # type: ignore[list-item]
    assert seen == [True]


@pytest.mark.parametrize("policy", ["reject", "allow"])
def test_unwritable_sink(identity: Sim, tenants: Tenants, tmp_path: Path, policy: str) -> None:
    cfg = base_config(
        {"swc": identity}, tenants, audit={"path": str(tmp_path), "on_failure": policy}
    )  # a directory: every write fails
    with gateway(cfg) as gw:
        r = httpx.post(
            f"{gw.url}/openai/v1/responses",
            json={"model": "gpt-4.1", "input": "x", "tools": [mcp_tool()]},
            headers={"api-key": tenants.key("team-a")},
        )
        plain = httpx.post(  # no MCP content: nothing to audit, always forwarded
            f"{gw.url}/openai/v1/responses",
            json={"model": "gpt-4.1", "input": "x"},
            headers={"api-key": tenants.key("team-a")},
        )
        metrics = httpx.get(gw.url + "/metrics").text
    assert plain.status_code == 200
    assert 'gateway_audit_write_failures_total{sink="file"}' in metrics
    if policy == "reject":
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        assert len(identity.state.api_requests()) == 1
    else:
        assert r.status_code == 200
        assert len(identity.state.api_requests()) == 2


def test_verify_detects_edit_delete_reorder(
    agw: Server, audit_path: Path, tenants: Tenants
) -> None:
    client = _client(agw, tenants)
    for i in range(3):
        client.responses.create(model="gpt-4.1", input=f"q{i}", tools=[mcp_tool()])  # type: ignore[list-item]
    assert verify([str(audit_path)]) == (9, None)
    lines = audit_path.read_text().splitlines(keepends=True)
    bad = audit_path.with_name("bad.jsonl")
    edited = lines.copy()
    edited[4] = edited[4].replace('"search"', '"delete"')
    for variant, line_no in (
        (edited, 5),
        (lines[:3] + lines[4:], 4),
        ([*lines[:2], lines[3], lines[2], *lines[4:]], 3),
    ):
        bad.write_text("".join(variant))
        count, problem = verify([str(bad)])
        assert problem is not None and f"bad.jsonl:{line_no}:" in problem
        assert count == line_no - 1


def test_rotation_keeps_the_chain(identity: Sim, tenants: Tenants, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = {"type": "file", "path": str(path), "max_bytes": 3000, "backups": 20}
    cfg = base_config({"swc": identity}, tenants, audit={"sinks": [sink]})
    with gateway(cfg) as gw:
        for i in range(6):
            _client(gw, tenants).responses.create(
                model="gpt-4.1", input=f"q{i}", tools=[mcp_tool()]
            )  # type: ignore[list-item]
    rotated = sorted(tmp_path.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    assert len(rotated) >= 2
    files = [str(p) for p in rotated] + [str(path)]
    assert verify(files) == (18, None)
    # a restart continues the chain of the current file
    with gateway(cfg) as gw:
        _client(gw, tenants).responses.create(model="gpt-4.1", input="again", tools=[mcp_tool()])  # type: ignore[list-item]
    rotated = sorted(tmp_path.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    assert verify([str(p) for p in rotated] + [str(path)]) == (21, None)


def test_verify_cli(agw: Server, audit_path: Path, tenants: Tenants) -> None:
    from gateway.cli import main

    _client(agw, tenants).responses.create(model="gpt-4.1", input="q", tools=[mcp_tool()])  # type: ignore[list-item]
    assert main(["audit", "verify", str(audit_path)]) == 0
    audit_path.write_text(audit_path.read_text().replace("docs", "evil"))
    assert main(["audit", "verify", str(audit_path)]) == 1


def test_server_allowlist_and_enforced_approval(
    identity: Sim, tenants: Tenants, audit_path: Path
) -> None:
    cfg = base_config({"swc": identity}, tenants, audit={"path": str(audit_path)})
    cfg["tenants"]["team-a"]["mcp"] = {
        "allowed_servers": ["https://mcp.example.com/docs*", "connector_sharepoint"],
        "require_approval": "always",
    }
    with gateway(cfg) as gw:
        client = _client(gw, tenants)
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.responses.create(model="gpt-4.1", input="x", tools=[mcp_tool("evil")])  # type: ignore[list-item]
        assert info.value.code == "mcp_server_not_allowed" and "'evil'" in info.value.message
        assert identity.state.api_requests() == []
        client.responses.create(model="gpt-4.1", input="x", tools=[mcp_tool("docs")])  # type: ignore[list-item]
    sent = json.loads(identity.state.api_requests()[-1].body)
    assert sent["tools"][0]["require_approval"] == "always"
    policy = next(r for r in records(audit_path) if r["event"] == "mcp.policy")
    assert policy["action"] == "require_approval_rewritten" and policy["from"] == "never"


def test_long_output_is_cut_with_length_and_hash(
    identity: Sim, tenants: Tenants, audit_path: Path
) -> None:
    cfg = base_config(
        {"swc": identity}, tenants, audit={"path": str(audit_path), "max_output_chars": 10}
    )
    with gateway(cfg) as gw:
        _client(gw, tenants).responses.create(
            model="gpt-4.1",
            input="a fairly long query",
            tools=[mcp_tool()],  # type: ignore[list-item]
        )
    call = next(r for r in records(audit_path) if r["event"] == "mcp.call")
    full = "results for a fairly long query"
    import hashlib

    assert call["output"] == full[:10] and call["output_length"] == len(full)
    assert call["output_sha256"] == hashlib.sha256(full.encode()).hexdigest()


def test_client_address_from_trusted_proxy_only(
    identity: Sim, tenants: Tenants, audit_path: Path
) -> None:
    body = {"model": "gpt-4.1", "input": "x", "tools": [mcp_tool()]}
    headers = {"api-key": tenants.key("team-a"), "x-forwarded-for": "203.0.113.7, 10.1.2.3"}
    for trusted, expected in (([], "127.0.0.1"), (["127.0.0.0/8", "10.0.0.0/8"], "203.0.113.7")):
        audit_path.unlink(missing_ok=True)
        cfg = base_config(
            {"swc": identity},
            tenants,
            audit={"path": str(audit_path)},
            server={"trusted_proxies": trusted},
        )
        with gateway(cfg) as gw:
            httpx.post(f"{gw.url}/openai/v1/responses", json=body, headers=headers)
        assert records(audit_path)[0]["client_addr"] == expected


def test_redis_stream_sink(identity: Sim, tenants: Tenants, redis_server: RedisServer) -> None:
    import redis

    redis_server.flush()
    sink = {"type": "redis", "url_env": "AUDIT_REDIS", "stream": "audit:test", "maxlen": 1000}
    cfg = base_config({"swc": identity}, tenants, audit={"sinks": [sink, {"type": "stdout"}]})
    with gateway(cfg, {"AUDIT_REDIS": redis_server.url}) as gw:
        _client(gw, tenants).responses.create(model="gpt-4.1", input="x", tools=[mcp_tool()])  # type: ignore[list-item]
    with redis.Redis.from_url(redis_server.url) as r:
        entries = r.xrange("audit:test")
    events = [json.loads(fields[b"record"])["event"] for _, fields in entries]
    assert events == ["mcp.tool", "mcp.list_tools", "mcp.call"]


def test_items_passed_back_as_input_are_recorded(
    agw: Server, audit_path: Path, tenants: Tenants
) -> None:
    client = _client(agw, tenants)
    first = client.responses.create(
        model="gpt-4.1",
        input="q",
        tools=[mcp_tool()],
        store=False,  # type: ignore[list-item]
    )
    items = [i.model_dump(exclude_none=True) for i in first.output]
    client.responses.create(
        model="gpt-4.1",
        store=False,
        tools=[mcp_tool()],  # type: ignore[list-item]
        input=[*items, {"role": "user", "content": "and then?"}],  # type: ignore[list-item]
    )
    recs = [r for r in records(audit_path) if r.get("source") == "input"]
    assert [r["event"] for r in recs] == ["mcp.list_tools", "mcp.call"]
    assert json.loads(recs[1]["arguments"])["api_key"] == "[REDACTED]"
    assert recs[1]["item_id"] == items[1]["id"]


def test_100_kb_approval_reason_then_restart_then_verify(
    identity: Sim, tenants: Tenants, audit_path: Path
) -> None:
    cfg = base_config({"swc": identity}, tenants, audit={"path": str(audit_path)})
    reason = "because " * 12_500  # 100 kB, far beyond the old 64 KiB tail read
    approval = {
        "type": "mcp_approval_response",
        "approval_request_id": "mcpr_1",
        "approve": True,
        "reason": reason,
    }
    for _ in range(2):  # the second gateway continues the chain the first one wrote
        with gateway(cfg) as gw:
            r = httpx.post(
                gw.url + "/openai/v1/responses",
                json={"model": "gpt-4.1", "input": [approval], "tools": [mcp_tool()]},
                headers={"api-key": tenants.key("team-a")},
            )
            assert r.status_code == 200
    recs = records(audit_path)
    approvals = [r for r in recs if r["event"] == "mcp.approval"]
    assert len(approvals) == 2
    for rec in approvals:
        assert len(rec["reason"]) == 4096 and rec["reason_truncated"] is True
        assert rec["reason_length"] == len(reason)
        assert rec["reason_sha256"] == hashlib.sha256(reason.encode()).hexdigest()
    assert recs[len(recs) // 2]["prev_hash"] == recs[len(recs) // 2 - 1]["hash"]
    assert verify([str(audit_path)]) == (len(recs), None)


def test_policy_record_secret_and_server_url_tokens_are_redacted(
    identity: Sim, tenants: Tenants, audit_path: Path
) -> None:
    cfg = base_config({"swc": identity}, tenants, audit={"path": str(audit_path)})
    cfg["tenants"]["team-a"]["mcp"] = {"require_approval": "always"}
    approval = {"never": {"tool_names": ["search"]}, "api_key": "policy-secret-789"}
    url = "https://user:url-pass-321@mcp.example.com/sse?token=url-token-654&mode=x"
    long_label = "L" * 10_000
    with gateway(cfg) as gw:
        r = httpx.post(
            gw.url + "/openai/v1/responses",
            json={
                "model": "gpt-4.1",
                "input": "x",
                "tools": [mcp_tool(approval=approval, server_url=url, server_label=long_label)],  # type: ignore[arg-type]
            },
            headers={"api-key": tenants.key("team-a")},
        )
        assert r.status_code == 200
    text = audit_path.read_text()
    for secret in ("policy-secret-789", "url-pass-321", "url-token-654"):
        assert secret not in text
    recs = records(audit_path)
    policy = next(r for r in recs if r["event"] == "mcp.policy")
    assert policy["from"] == {"never": {"tool_names": ["search"]}, "api_key": "[REDACTED]"}
    tool = next(r for r in recs if r["event"] == "mcp.tool")
    expected = "https://[REDACTED]@mcp.example.com/sse?token=[REDACTED]&mode=[REDACTED]"
    assert tool["server_url"] == expected
    assert tool["server_label_truncated"] is True and len(tool["server_label"]) == 4096
    assert verify([str(audit_path)]) == (len(recs), None)


def test_redis_stream_sink_on_a_cluster(
    identity: Sim, tenants: Tenants, redis_cluster: Any
) -> None:
    from redis.cluster import RedisCluster
    from redis.crc import key_slot

    redis_cluster.flush()
    # A stream key served by another node than the one in the URL: a plain client gets MOVED.
    stream = next(
        f"audit:{n}"
        for n in range(1000)
        if redis_cluster.port_of_slot(key_slot(f"audit:{n}".encode())) != redis_cluster.ports[0]
    )
    sink = {"type": "redis", "url_env": "AUDIT_REDIS", "stream": stream, "mode": "cluster"}
    cfg = base_config({"swc": identity}, tenants, audit={"sinks": [sink]})
    with gateway(cfg, {"AUDIT_REDIS": redis_cluster.url}) as gw:
        _client(gw, tenants).responses.create(model="gpt-4.1", input="x", tools=[mcp_tool()])  # type: ignore[list-item]
    with RedisCluster.from_url(redis_cluster.url) as r:
        entries = r.xrange(stream)
    events = [json.loads(fields[b"record"])["event"] for _, fields in entries]
    assert events == ["mcp.tool", "mcp.list_tools", "mcp.call"]
