"""Keys at runtime: the admin API (create, list, retrieve, rotate, revoke), tenant admins,
the audit records of admin actions, the CLI, and hostile admin bodies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants, base_config, gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit_sinks import verify
from gateway.keys import hash_key, new_key

ADMIN = new_key()
TEAM_B_ADMIN = new_key()


@pytest.fixture
def agw(identity: Sim, tenants: Tenants, tmp_path: Path) -> Iterator[Server]:
    cfg = base_config({"swc": identity}, tenants)
    cfg["admin"] = {
        "key_sha256": hash_key(ADMIN),
        "keys": [{"id": "lead-b", "sha256": hash_key(TEAM_B_ADMIN), "tenants": ["team-b"]}],
    }
    cfg["audit"] = {"path": str(tmp_path / "audit.jsonl")}
    with gateway(cfg) as server:
        server.audit_path = tmp_path / "audit.jsonl"  # type: ignore[attr-defined]
        yield server


def _admin(gw: Server, method: str, path: str, key: str = ADMIN, **kw: Any) -> httpx.Response:
    return httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {key}"}, **kw)


def _use(gw: Server, key: str) -> int:
    return httpx.post(
        gw.url + "/openai/v1/responses",
        headers={"api-key": key},
        json={"model": "gpt-4.1", "input": "x"},
    ).status_code


def test_create_use_list_rotate_revoke(agw: Server, tenants: Tenants) -> None:
    r = _admin(agw, "POST", "/admin/keys", json={"tenant": "team-a", "name": "ci"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["key"].startswith("gk-") and made["source"] == "api"
    assert made["tenant"] == "team-a" and made["last_used_at"] is None
    assert made["created_at"].endswith("Z")
    key = made["key"]
    # Used at once, through the real client, as the tenant.
    client = openai.OpenAI(base_url=agw.url + "/openai/v1/", api_key=key, max_retries=0)
    resp = client.responses.create(model="gpt-4.1", input="hi")
    assert client.responses.retrieve(resp.id).id == resp.id
    # Listed with config keys; never a secret or a hash.
    listing = _admin(agw, "GET", "/admin/keys?tenant=team-a")
    assert listing.status_code == 200
    rows = {row["id"]: row for row in listing.json()["data"]}
    assert rows[made["id"]]["last_used_at"] is not None
    assert rows["team-a-key"]["source"] == "config"
    text = listing.text
    assert key not in text and hash_key(key) not in text and tenants.key("team-a") not in text
    scrape = httpx.get(agw.url + "/metrics").text
    line = f'gateway_key_last_used_timestamp_seconds{{key_id="{made["id"]}",tenant="team-a"}}'
    assert line in scrape
    one = _admin(agw, "GET", f"/admin/keys/{made['id']}")
    assert one.json()["name"] == "ci" and "key" not in one.json()
    # Rotate without grace: the old secret stops at once, the new one works, same id.
    r = _admin(agw, "POST", f"/admin/keys/{made['id']}/rotate", json={"grace_seconds": 0})
    assert r.status_code == 201 and r.json()["id"] == made["id"]
    new = r.json()["key"]
    assert new != key and _use(agw, key) == 401 and _use(agw, new) == 200
    # Rotate with grace: both work until it ends.
    r = _admin(agw, "POST", f"/admin/keys/{made['id']}/rotate", json={"grace_seconds": 2})
    newer = r.json()["key"]
    assert _use(agw, new) == 200 and _use(agw, newer) == 200
    time.sleep(2.2)
    assert _use(agw, new) == 401 and _use(agw, newer) == 200
    # Revoke.
    r = _admin(agw, "DELETE", f"/admin/keys/{made['id']}")
    assert r.status_code == 200 and r.json() == {"id": made["id"], "revoked": True}
    assert _use(agw, newer) == 401
    assert _admin(agw, "GET", f"/admin/keys/{made['id']}").status_code == 404
    # Config keys are changed in the config.
    for method, path in (
        ("POST", "/admin/keys/team-a-key/rotate"),
        ("DELETE", "/admin/keys/team-a-key"),
    ):
        r = _admin(agw, method, path, json={} if method == "POST" else None)
        assert r.status_code == 409 and r.json()["error"]["code"] == "key_in_config"
    # Every change is in the audit chain, naming the actor, with no secret.
    records = [json.loads(line) for line in agw.audit_path.read_text().splitlines()]  # type: ignore[attr-defined]
    events = [
        (r["event"], r["actor"], r["key_id"]) for r in records if r["event"].startswith("admin.")
    ]
    assert events == [
        ("admin.key_created", "admin", made["id"]),
        ("admin.key_rotated", "admin", made["id"]),
        ("admin.key_rotated", "admin", made["id"]),
        ("admin.key_revoked", "admin", made["id"]),
    ]
    audit_text = agw.audit_path.read_text()  # type: ignore[attr-defined]
    assert all(k not in audit_text for k in (key, new, newer, hash_key(key)))
    assert verify([str(agw.audit_path)]) == (len(records), None)  # type: ignore[attr-defined]


def test_expired_runtime_key(agw: Server) -> None:
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    r = _admin(
        agw, "POST", "/admin/keys", json={"tenant": "team-a", "name": "t", "expires_at": soon}
    )
    key = r.json()["key"]
    assert r.json()["expires_at"] == soon and _use(agw, key) == 200
    time.sleep(2.2)
    r = httpx.post(
        agw.url + "/openai/v1/responses",
        headers={"api-key": key},
        json={"model": "gpt-4.1", "input": "x"},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "expired_api_key"


def test_tenant_admins_manage_their_tenants_only(agw: Server) -> None:
    lead = TEAM_B_ADMIN
    r = _admin(agw, "POST", "/admin/keys", lead, json={"tenant": "team-a", "name": "x"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_not_managed"
    r = _admin(agw, "POST", "/admin/keys", lead, json={"tenant": "team-b", "name": "mine"})
    assert r.status_code == 201
    mine = r.json()["id"]
    theirs = _admin(agw, "POST", "/admin/keys", json={"tenant": "team-a", "name": "a"}).json()["id"]
    rows = _admin(agw, "GET", "/admin/keys", lead).json()["data"]
    assert {row["tenant"] for row in rows} == {"team-b"} and mine in {row["id"] for row in rows}
    assert _admin(agw, "GET", "/admin/keys?tenant=team-a", lead).status_code == 403
    for method, path in (
        ("GET", f"/admin/keys/{theirs}"),
        ("DELETE", f"/admin/keys/{theirs}"),
        ("POST", f"/admin/keys/{theirs}/rotate"),
        ("DELETE", "/admin/keys/team-a-key"),
    ):
        assert _admin(agw, method, path, lead).status_code == 403, (method, path)
    # A tenant key is no admin key, and no key is none either.
    assert _admin(agw, "GET", "/admin/keys", "gk-nope").status_code == 401
    assert httpx.get(agw.url + "/admin/keys").status_code == 401


def test_admin_api_off_without_admin_keys(gw: Server) -> None:
    assert _admin(gw, "GET", "/admin/keys").status_code == 404


bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "tenant": st.sampled_from(["team-a", "team-b", "nope", ""]) | bodies,
        "name": st.text(max_size=80) | bodies,
        "expires_at": st.sampled_from(["2020-01-01T00:00:00Z", "2099-01-01T00:00:00", "x"])
        | bodies,
        "metadata": bodies,
        "extra": bodies,
    },
)


def test_hostile_admin_bodies(agw: Server) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=fields | bodies, grace=bodies)
    def attack(body: Any, grace: Any) -> None:
        r = _admin(agw, "POST", "/admin/keys", content=json.dumps(body).encode())
        assert r.status_code in (201, 400, 403), r.text
        if r.status_code != 201:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert "gk-" not in r.text
            return
        made = r.json()
        rot = _admin(
            agw,
            "POST",
            f"/admin/keys/{made['id']}/rotate",
            content=json.dumps({"grace_seconds": grace}),
        )
        assert rot.status_code in (201, 400), rot.text
        if rot.status_code == 400:
            assert made["key"] not in rot.text
        assert _admin(agw, "DELETE", f"/admin/keys/{made['id']}").status_code == 200

    attack()


def test_cli(agw: Server, tenants: Tenants) -> None:
    """The admin CLI: the gateway from GATEWAY_ADMIN_URL (or --url), tables and JSON, no
    Python reprs, get, and a rotation that keeps when the key was last used."""
    env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN, "GATEWAY_ADMIN_URL": agw.url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "admin", "keys", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    out = cli("create", "--tenant", "team-a", "--name", "laptop")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert "None" not in out.stdout and "last_used_at: -" in out.stdout.replace("  ", "")
    made = json.loads(cli("create", "--tenant", "team-a", "--name", "ci", "--json").stdout)
    key_id = made["id"]
    assert made["key"].startswith("gk-") and _use(agw, made["key"]) == 200
    assert key.startswith("gk-") and _use(agw, key) == 200
    listed = cli("list", "--tenant", "team-a")
    assert key_id in listed.stdout and key not in listed.stdout and "None" not in listed.stdout
    header = listed.stdout.splitlines()[0].split()
    assert header == ["id", "tenant", "name", "source", "expires_at", "last_used_at"]
    got = json.loads(cli("get", key_id, "--json").stdout)
    assert got["id"] == key_id and "key" not in got
    time.sleep(0.1)
    rotated = json.loads(cli("rotate", key_id, "--grace-seconds", "0", "--json").stdout)
    assert rotated["last_used_at"] is not None  # kept across the rotation
    new = rotated["key"]
    assert _use(agw, made["key"]) == 401 and _use(agw, new) == 200
    assert cli("revoke", key_id).returncode == 0 and _use(agw, new) == 401
    bad = cli("revoke", "team-a-key")
    assert bad.returncode != 0 and "409" in bad.stderr
    # Without GATEWAY_ADMIN_URL, --url is asked for; with it, --url still wins.
    del env["GATEWAY_ADMIN_URL"]
    out = cli("list")
    assert out.returncode != 0 and "GATEWAY_ADMIN_URL" in out.stderr
    assert cli("list", "--url", agw.url).returncode == 0


def test_top_level_help_lists_every_command() -> None:
    from gateway.cli import build_parser

    text = build_parser().format_help()
    for command in ("serve", "check", "keys", "admin", "audit", "usage", "simulate", "demo"):
        assert command in text


def test_adopt_objects_made_around_the_gateway(agw: Server, sim: Sim, tenants: Tenants) -> None:
    """A file uploaded straight to the resource belongs to no tenant (refused) until an admin
    adopts it; other tenants still get 404; another tenant's object cannot be adopted."""
    direct = httpx.post(
        sim.url + "/openai/v1/files",
        headers={"api-key": sim.state.api_key},
        files={"file": ("old.txt", b"made before the gateway")},
        data={"purpose": "assistants"},
    ).json()["id"]
    a = openai.OpenAI(
        base_url=agw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0
    )
    b = openai.OpenAI(
        base_url=agw.url + "/openai/v1/", api_key=tenants.key("team-b"), max_retries=0
    )
    part = [{"role": "user", "content": [{"type": "input_file", "file_id": direct}]}]
    with pytest.raises(openai.NotFoundError):
        a.responses.create(model="gpt-4.1", input=part)  # type: ignore[arg-type]
    body = {"tenant": "team-a", "resource": "swc", "kind": "file", "ids": [direct]}
    assert _admin(agw, "POST", "/admin/objects", TEAM_B_ADMIN, json=body).status_code == 403
    r = _admin(agw, "POST", "/admin/objects", json=body)
    assert r.status_code == 200 and r.json()["adopted"] == [direct]
    assert a.responses.create(model="gpt-4.1", input=part).id  # type: ignore[arg-type]
    assert a.files.retrieve(direct).id == direct
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(direct)
    # Bound to team-a now: adopting it for team-b is a conflict, and nothing changes.
    other = {**body, "tenant": "team-b", "ids": [direct]}
    r = _admin(agw, "POST", "/admin/objects", json=other)
    assert r.status_code == 409 and r.json()["error"]["code"] == "object_owned"
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(direct)
    for bad in (
        {**body, "kind": "assistant"},
        {**body, "resource": "nope"},
        {**body, "ids": ["../x"]},
        {**body, "ids": ["conv_0123456789abcdef01234567"]},  # a conversation's shape
        {**body, "ids": []},
    ):
        r = _admin(agw, "POST", "/admin/objects", json=bad)
        assert r.status_code == 400, bad
    audit = agw.audit_path.read_text()  # type: ignore[attr-defined]
    assert '"event":"admin.objects_adopted"' in audit.replace(" ", "")


def test_adoption_takes_whole_ids_only_and_obeys_region_pins(
    identity: Sim, sim2: Sim, tenants: Tenants
) -> None:
    """An id with a trailing newline is not an id; a resource outside the tenant's
    region pin is refused, whatever the objects."""
    cfg = base_config({"swc": identity, "frc": sim2}, tenants)
    cfg["admin"] = {"key_sha256": hash_key(ADMIN)}
    cfg["tenants"]["team-a"]["regions"] = ["swedencentral"]
    fid = "file-" + "a" * 24
    with gateway(cfg) as gw:
        body = {"tenant": "team-a", "resource": "swc", "kind": "file"}
        r = _admin(gw, "POST", "/admin/objects", json={**body, "ids": [fid + "\n"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_id"
        r = _admin(gw, "POST", "/admin/objects", json={**body, "resource": "frc", "ids": [fid]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "region_not_allowed"
        r = _admin(gw, "POST", "/admin/objects", json={**body, "ids": [fid]})
        assert r.status_code == 200 and r.json()["adopted"] == [fid]


def test_an_open_batchs_files_cannot_be_claimed_before_anyone_fetched_them(
    identity: Sim, tenants: Tenants
) -> None:
    """team-a's batch completes; nobody has retrieved it (the watcher is slow), so the
    gateway has not seen its output file yet. An admin who learned the file's id straight
    from Azure cannot adopt it for team-b: the gateway asks Azure about its open batches
    first, and the file is team-a's."""
    identity.state.batch_seconds = 0.2
    cfg = base_config({"swc": identity}, tenants)
    cfg["models"]["gpt-4.1"].append({"resource": "swc", "deployment": "dep-41-b", "batch": True})
    cfg["admin"] = {"key_sha256": hash_key(ADMIN)}
    cfg["batches"] = {"poll_seconds": 3600}
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/responses"}
    line["body"] = {"model": "gpt-4.1", "input": "x"}  # type: ignore[assignment]
    with gateway(cfg) as gw:
        a = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"))
        upload = a.files.create(file=("b.jsonl", json.dumps(line).encode()), purpose="batch")
        batch = a.batches.create(
            input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
        )
        time.sleep(0.4)
        direct = httpx.get(
            identity.url + f"/openai/v1/batches/{batch.id}",
            headers={"api-key": identity.state.api_key},
        ).json()
        output = direct["output_file_id"]
        assert direct["status"] == "completed" and output
        body = {"tenant": "team-b", "resource": "swc", "kind": "file", "ids": [output]}
        r = _admin(gw, "POST", "/admin/objects", json=body)
        assert r.status_code == 409 and r.json()["error"]["code"] == "object_owned"
        assert a.files.retrieve(output).id == output  # team-a's, as it should be


def test_admin_requests_have_one_owner(agw: Server, caplog: pytest.LogCaptureFixture) -> None:
    """Admin requests are exchanges like any other: an access line naming the actor,
    counted in metrics, a bounded body, errors with their x-request-id."""
    import logging

    caplog.set_level(logging.INFO, logger="gateway.access")
    r = _admin(agw, "GET", "/admin/keys")
    assert r.status_code == 200 and r.headers["x-request-id"]
    big = b'{"tenant": "team-a", "name": "' + b"x" * (1 << 20) + b'"}'
    r = _admin(agw, "POST", "/admin/keys", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.headers["x-request-id"]
    deadline = time.monotonic() + 3
    while len(lines := [x for x in caplog.records if x.name == "gateway.access"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [getattr(x, "operation", None) for x in lines[:2]] == [
        "admin.keys.list",
        "admin.keys.create",
    ]
    assert all(getattr(x, "actor", None) == "admin" for x in lines[:2])
    metrics = httpx.get(agw.url + "/metrics").text
    assert 'operation="admin.keys.list",status="200"' in metrics
    assert 'operation="admin.keys.create",status="413"' in metrics
