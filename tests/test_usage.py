"""The usage ledger: a scripted day over two tenants, read by `gateway usage` and the admin API."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from harness import RedisServer, Sim, Tenants, base_config, gateway

from gateway.keys import hash_key, new_key

PRICES = {"currency": "EUR", "input": 2.0, "cached_input": 0.5, "output": 8.0, "reasoning": 10.0}
URL = "/openai/v1/responses"


def _expected(usages: list[dict[str, Any]]) -> dict[str, Any]:
    rows = {"requests": len(usages), "input_tokens": 0, "cached_tokens": 0}
    rows |= {"output_tokens": 0, "reasoning_tokens": 0, "cost": 0.0}
    for u in usages:
        cached = u["input_tokens_details"]["cached_tokens"]
        reasoning = u["output_tokens_details"]["reasoning_tokens"]
        rows["input_tokens"] += u["input_tokens"]
        rows["cached_tokens"] += cached
        rows["output_tokens"] += u["output_tokens"]
        rows["reasoning_tokens"] += reasoning
        rows["cost"] += (
            (u["input_tokens"] - cached) * 2.0
            + cached * 0.5
            + (u["output_tokens"] - reasoning) * 8.0
            + reasoning * 10.0
        ) / 1e6
    return rows


def _traffic(gw_url: str, tenants: Tenants) -> dict[str, list[dict[str, Any]]]:
    """Three requests from team-a (with cached and reasoning tokens), two from team-b."""
    usages: dict[str, list[dict[str, Any]]] = {"team-a": [], "team-b": []}
    with httpx.Client(base_url=gw_url) as client:
        for n in range(3):
            headers = {"api-key": tenants.key("team-a"), "x-sim-cached-tokens": "2"}
            headers["x-sim-reasoning-tokens"] = str(n)
            r = client.post(URL, json={"model": "gpt-4.1", "input": f"a{n}"}, headers=headers)
            usages["team-a"].append(r.json()["usage"])
        b = {"api-key": tenants.key("team-b")}
        usages["team-b"].append(
            client.post(URL, json={"model": "gpt-4.1", "input": "b"}, headers=b).json()["usage"]
        )
        r = client.post(URL, json={"model": "gpt-4.1", "input": "bb", "stream": True}, headers=b)
        done = [
            json.loads(line[6:]) for line in r.text.splitlines() if '"response.completed"' in line
        ]
        usages["team-b"].append(done[0]["response"]["usage"])
    return usages


def _check(rows: list[dict[str, Any]], usages: dict[str, list[dict[str, Any]]], day: str) -> None:
    assert [(r["tenant"], r["model"]) for r in rows] == [
        ("team-a", "gpt-4.1"),
        ("team-b", "gpt-4.1"),
    ]
    for row in rows:
        want = _expected(usages[row["tenant"]])
        assert row["date"] == day and row["currency"] == "EUR"
        for field in (
            "requests",
            "input_tokens",
            "cached_tokens",
            "output_tokens",
            "reasoning_tokens",
        ):
            assert int(row[field]) == want[field], (row, field)
        assert round(float(row["cost"]), 6) == round(want["cost"], 6)
        assert int(row["estimated_requests"]) == 0


def _usage_cli(tmp_path: Path, cfg: dict[str, Any], day: str) -> list[str]:
    """`gateway usage` for one day, with ``cfg`` written to a file."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = ["usage", "--config", str(path), "--from", day, "--to", day]
    return [sys.executable, "-m", "gateway.cli", *cmd]


def test_usage_ledger_on_redis(
    identity: Sim, tenants: Tenants, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.flush()
    admin = new_key()
    cfg = base_config({"swc": identity}, tenants, prices={"gpt-4.1": PRICES})
    cfg["state"] = {"backend": "redis", "url_env": "REDIS_URL"}
    cfg["admin"] = {"key_sha256": hash_key(admin)}
    env = {"REDIS_URL": redis_server.url}
    day = datetime.now(UTC).date().isoformat()
    with gateway(cfg, env) as gw:
        usages = _traffic(gw.url, tenants)
        q = {"from": day, "to": day}
        r = httpx.get(
            gw.url + "/admin/usage", params=q, headers={"authorization": f"Bearer {admin}"}
        )
        assert r.status_code == 200
        _check(r.json(), usages, day)
        for key in (tenants.key("team-a"), "gk-wrong"):
            refused = httpx.get(gw.url + "/admin/usage", params=q, headers={"api-key": key})
            assert (
                refused.status_code == 401
                and refused.json()["error"]["code"] == "invalid_admin_key"
            )
        bad = httpx.get(
            gw.url + "/admin/usage",
            params={"from": day, "to": "yesterday"},
            headers={"api-key": admin},
        )
        assert bad.status_code == 400 and "YYYY-MM-DD" in bad.json()["error"]["message"]
    cli = _usage_cli(tmp_path, cfg, day)
    env_all = {**__import__("os").environ, **env}
    out = subprocess.run(cli, capture_output=True, text=True, env=env_all, check=True).stdout
    _check(list(csv.DictReader(io.StringIO(out))), usages, day)
    out = subprocess.run(
        [*cli, "--format", "json", "--tenant", "team-b"],
        capture_output=True,
        text=True,
        env=env_all,
        check=True,
    ).stdout
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["tenant"] == "team-b" and rows[0]["requests"] == 2


def test_usage_on_memory_is_served_by_the_admin_api_only(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    admin = new_key()
    cfg = base_config({"swc": identity}, tenants, prices={"gpt-4.1": PRICES})
    cfg["state"] = {"backend": "memory"}
    day = datetime.now(UTC).date().isoformat()
    with gateway(cfg) as gw:
        # not configured: the admin API does not exist
        assert httpx.get(gw.url + "/admin/usage", headers={"api-key": admin}).status_code == 404
    cfg["admin"] = {"key_sha256": hash_key(admin)}
    with gateway(cfg) as gw:
        usages = _traffic(gw.url, tenants)
        r = httpx.get(
            gw.url + "/admin/usage",
            params={"from": day, "to": day, "format": "csv"},
            headers={"api-key": admin},
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        _check(list(csv.DictReader(io.StringIO(r.text))), usages, day)
    done = subprocess.run(_usage_cli(tmp_path, cfg, day), capture_output=True, text=True)
    assert done.returncode == 2 and "/admin/usage" in done.stderr


def test_usage_cli_reads_the_state_file_of_a_running_gateway(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    """The default backend (sqlite): `gateway usage` reads the ledger from the state file,
    read-only, while the gateway writing it serves."""
    cfg = base_config({"swc": identity}, tenants, prices={"gpt-4.1": PRICES})
    day = datetime.now(UTC).date().isoformat()
    with gateway(cfg) as gw:
        usages = _traffic(gw.url, tenants)
        time.sleep(0.2)  # settles are committed within milliseconds
        out = subprocess.run(_usage_cli(tmp_path, cfg, day), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        _check(list(csv.DictReader(io.StringIO(out.stdout))), usages, day)
    cfg["state"] = {"backend": "sqlite", "path": str(tmp_path / "missing.db")}
    done = subprocess.run(_usage_cli(tmp_path, cfg, day), capture_output=True, text=True)
    assert done.returncode == 1 and "no state file" in done.stderr


def test_admin_key_may_not_be_a_tenant_key(identity: Sim, tenants: Tenants) -> None:
    import pytest

    from gateway.config import ConfigError, parse_config

    cfg = base_config({"swc": identity}, tenants)
    cfg["admin"] = {"key_sha256": hash_key(tenants.key("team-a"))}
    with pytest.raises(ConfigError, match="admin key is a tenant key"):
        parse_config(cfg, {})


def test_ptu_hourly_cost_is_spread_by_token_share(identity: Sim, tenants: Tenants) -> None:
    admin = new_key()
    ptu = {**PRICES, "resources": {"swc": {"input": 0, "output": 0, "hourly": 30.0}}}
    cfg = base_config({"swc": identity}, tenants, prices={"gpt-4.1": ptu})
    cfg["admin"] = {"key_sha256": hash_key(admin)}
    day = datetime.now(UTC).date().isoformat()
    with gateway(cfg) as gw:
        usages = _traffic(gw.url, tenants)
        r = httpx.get(
            gw.url + "/admin/usage", params={"from": day, "to": day}, headers={"api-key": admin}
        )
    now = datetime.now(UTC)
    hours = now.hour + now.minute / 60 + now.second / 3600
    rows = {row["tenant"]: row for row in r.json()}
    tokens = {t: sum(u["input_tokens"] + u["output_tokens"] for u in usages[t]) for t in usages}
    assert all(row["cost"] == 0 for row in rows.values())  # 0 per token on the PTU
    total = rows["team-a"]["ptu_cost"] + rows["team-b"]["ptu_cost"]
    assert abs(total - 30.0 * hours) <= 30.0 * 0.01  # the whole day so far, within a minute
    if total > 0:  # just after midnight UTC there is no day to share yet
        share = rows["team-a"]["ptu_cost"] / total
        assert abs(share - tokens["team-a"] / (tokens["team-a"] + tokens["team-b"])) < 1e-3
