"""`gateway serve` on the default backend (sqlite), killed with SIGKILL while clients are
creating responses (JSON and streams), then started again on the same file: nothing a team
or the budget owner can see has changed.

- every response id a client received before the kill (a stream's from its first event)
  is its tenant's after the restart: 200 for the owner, 404 for another tenant;
- runtime keys are as they were: a created key works, a revoked one is 401, a rotated-out
  secret works until its grace deadline and not after;
- the day's spend holds at least what the ledger showed a second before the kill, and a
  spent day budget stays spent;
- a batch job open at the kill (its charge cut half-way) is still watched and charged once.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from harness import GatewayProcess, Sim, Tenants, base_config

from gateway.keys import hash_key, new_key
from gateway.simulator import IDENTITY_HEADER

PRICES = {"currency": "EUR", "input": 2.0, "output": 8.0, "batch_input": 1.2, "batch_output": 3.0}
BODY = {"model": "gpt-4.1", "input": "hello"}


def _usage(url: str, admin: str, tenant: str) -> dict[str, Any]:
    day = datetime.now(UTC).date().isoformat()
    rows = httpx.get(
        url + "/admin/usage",
        headers={"api-key": admin},
        params={"from": day, "to": day, "tenant": tenant},
        timeout=10,
    ).json()
    return {
        "requests": sum(int(r["requests"]) for r in rows),
        "cost": sum(float(r["cost"]) for r in rows),
        "rows": rows,
    }


def _load(url: str, key: str, stream: bool, seen: list[str], stop: threading.Event) -> None:
    """Create responses until stopped or the gateway dies; record each id when received."""
    headers = {"api-key": key}
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                if not stream:
                    r = client.post("/openai/v1/responses", json=BODY, headers=headers)
                    if r.status_code == 200:
                        seen.append(r.json()["id"])
                    continue
                body = {**BODY, "stream": True}
                with client.stream("POST", "/openai/v1/responses", json=body, headers=headers) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and '"response.created"' in line:
                            seen.append(json.loads(line[6:])["response"]["id"])
            except httpx.HTTPError:
                return  # the gateway was killed under us


def test_kill_9_under_load_then_restart(identity: Sim, tenants: Tenants, tmp_path: Path) -> None:
    sim = identity.state
    sim.batch_seconds = 0.3
    admin = new_key()
    cfg = base_config({"swc": identity}, tenants, prices={"gpt-4.1": PRICES})
    cfg["models"]["gpt-4.1"].append({"resource": "swc", "deployment": "dep-b", "batch": True})
    cfg["batches"] = {"poll_seconds": 0.2}
    cfg["admin"] = {"key_sha256": hash_key(admin)}
    cfg["tenants"]["team-b"]["budgets"] = {"currency": "EUR", "per_day": 0.00001}
    assert "state" not in cfg  # the default: gateway-state.db in the working directory
    env = {"IDENTITY_ENDPOINT": f"{identity.url}/msi/token", "IDENTITY_HEADER": IDENTITY_HEADER}
    admin_h = {"api-key": admin}
    a_key, b_key = tenants.key("team-a"), tenants.key("team-b")

    first = GatewayProcess(cfg, str(tmp_path), env).start()
    try:
        url = first.url
        # Runtime keys: one kept, one revoked, one rotated with a grace that ends after the
        # restart.
        kept = httpx.post(
            url + "/admin/keys", json={"tenant": "team-a", "name": "kept"}, headers=admin_h
        ).json()
        gone = httpx.post(
            url + "/admin/keys", json={"tenant": "team-a", "name": "gone"}, headers=admin_h
        ).json()
        assert httpx.delete(f"{url}/admin/keys/{gone['id']}", headers=admin_h).status_code == 200
        rotating = httpx.post(
            url + "/admin/keys", json={"tenant": "team-a", "name": "rot"}, headers=admin_h
        ).json()
        grace = 10
        rotation = httpx.post(
            f"{url}/admin/keys/{rotating['id']}/rotate",
            json={"grace_seconds": grace},
            headers=admin_h,
        )
        assert rotation.status_code == 201, rotation.text
        rotated = rotation.json()
        grace_ends = time.time() + grace
        # team-b spends its day budget.
        b = {"api-key": b_key}
        assert httpx.post(url + "/openai/v1/responses", json=BODY, headers=b).status_code == 200
        spent = httpx.post(url + "/openai/v1/responses", json=BODY, headers=b)
        assert spent.status_code == 429 and spent.json()["error"]["code"] == "insufficient_quota"
        # A batch job whose charge is cut by the kill: the watcher's first download of the
        # output hangs.
        line = {"custom_id": "1", "method": "POST", "url": "/v1/responses", "body": BODY}
        up = httpx.post(
            url + "/openai/v1/files",
            files={"file": ("in.jsonl", json.dumps(line).encode())},
            data={"purpose": "batch"},
            headers={"api-key": a_key},
        ).json()
        sim.content_delays, sim.content_delay = 1, 30.0
        batch = httpx.post(
            url + "/openai/v1/batches",
            json={
                "input_file_id": up["id"],
                "endpoint": "/v1/responses",
                "completion_window": "24h",
            },
            headers={"api-key": a_key},
        ).json()
        # Load: JSON and streamed creates for team-a.
        seen: list[str] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=_load, args=(url, a_key, stream, seen, stop), daemon=True)
            for stream in (False, False, True, True)
        ]
        for t in threads:
            t.start()
        time.sleep(1.5)
        before = _usage(url, admin, "team-a")
        assert before["requests"] > 0
        time.sleep(1.0)
        deadline = time.monotonic() + 10
        while not any(r.path.endswith("/content") for r in sim.requests):
            assert time.monotonic() < deadline, "the watcher never started charging"
            time.sleep(0.02)
        first.stop(kill=True)  # SIGKILL, mid-load and mid-charge
        stop.set()
        for t in threads:
            t.join(15)
        returned = list(seen)
    finally:
        first.stop(kill=True)
    assert len(returned) > 20, len(returned)

    again = GatewayProcess(cfg, str(tmp_path), env).start()
    try:
        url = again.url
        with httpx.Client(base_url=url, timeout=10) as client:

            def status(key: str) -> int:
                return client.get("/openai/v1/models", headers={"api-key": key}).status_code

            assert status(kept["key"]) == 200
            assert status(gone["key"]) == 401
            assert status(rotated["key"]) == 200
            assert time.time() < grace_ends, "the restart took longer than the grace"
            assert status(rotating["key"]) == 200  # within the grace
            for rid in returned:
                mine = client.get(f"/openai/v1/responses/{rid}", headers={"api-key": a_key})
                assert mine.status_code == 200, (rid, mine.text)
                theirs = client.get(f"/openai/v1/responses/{rid}", headers={"api-key": b_key})
                assert theirs.status_code == 404, rid
            follow = {**BODY, "previous_response_id": returned[-1]}
            assert (
                client.post("/openai/v1/responses", json=follow, headers={"api-key": a_key})
            ).status_code == 200

            time.sleep(max(0.0, grace_ends - time.time()) + 1.0)
            assert status(rotating["key"]) == 401  # the deadline survived the restart
            assert status(rotated["key"]) == 200
            # team-b's budget was not reset by the restart.
            refused = client.post("/openai/v1/responses", json=BODY, headers={"api-key": b_key})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "insufficient_quota"
            # The batch, cut half-way through its charge, is charged once by the new process.
            deadline = time.monotonic() + 15
            while not _batch_charged(url) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _batch_charged(url) == 1.0
            time.sleep(1.0)  # more polls: still once
            assert _batch_charged(url) == 1.0
            got = client.get(f"/openai/v1/batches/{batch['id']}", headers={"api-key": a_key})
            assert got.status_code == 200 and got.json()["status"] == "completed"
            after = _usage(url, admin, "team-a")
            assert after["requests"] >= before["requests"]
            assert after["cost"] >= before["cost"]
    finally:
        again.stop()


def _batch_charged(url: str) -> float:
    import re

    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.findall(
        r'gateway_batch_charged_total\{[^}]*tenant="team-a"[^}]*\} ([0-9.e+]+)', text
    )
    return sum(float(v) for v in found)
