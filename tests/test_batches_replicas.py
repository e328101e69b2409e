"""A completed batch is charged exactly once across replicas, restarts and retrieves."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
from harness import GatewayProcess, RedisServer, Sim, Tenants, base_config, gateway

from gateway.keys import hash_key, new_key
from gateway.simulator import IDENTITY_HEADER

PRICES = {"currency": "EUR", "input": 2.0, "output": 8.0, "batch_input": 1.2, "batch_output": 3.0}


def test_charged_once_across_replicas_a_killed_watcher_and_retrieves(
    identity: Sim, tenants: Tenants, redis_server: RedisServer, tmp_path: Path
) -> None:
    redis_server.flush()
    sim = identity.state
    sim.batch_seconds = 0.5
    admin = new_key()
    cfg = base_config({"swc": identity}, tenants, prices={"gpt-4.1": PRICES})
    cfg["models"]["gpt-4.1"].append({"resource": "swc", "deployment": "dep-b", "batch": True})
    cfg["state"] = {"backend": "redis", "url_env": "REDIS_URL"}
    cfg["batches"] = {"poll_seconds": 0.2, "lease_seconds": 1.5}
    cfg["admin"] = {"key_sha256": hash_key(admin)}
    env = {
        "REDIS_URL": redis_server.url,
        "IDENTITY_ENDPOINT": f"{identity.url}/msi/token",
        "IDENTITY_HEADER": IDENTITY_HEADER,
    }
    key = tenants.key("team-a")
    first = GatewayProcess(cfg, str(tmp_path), env).start()
    try:
        client = openai.OpenAI(base_url=first.url + "/openai/v1/", api_key=key, max_retries=0)
        lines = [
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/responses",
                    "body": {"model": "gpt-4.1", "input": f"question number {i}"},
                }
            ).encode()
            for i in range(20)
        ]
        upload = client.files.create(file=("in.jsonl", b"\n".join(lines)), purpose="batch")
        # The first download of the output file (the watcher's, charging) hangs 5 s: the
        # replica holding the watcher's lease is killed in the middle of it.
        sim.content_delays, sim.content_delay = 1, 5.0
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(r.path.endswith("/content") for r in sim.requests):
                break
            time.sleep(0.02)
        assert any(r.path.endswith("/content") for r in sim.requests), "the watcher never charged"
        first.stop(kill=True)
    finally:
        first.stop(kill=True)

    again = GatewayProcess(cfg, str(tmp_path), env).start()  # the killed replica, restarted
    try:
        with gateway(cfg, env) as other:
            urls = [again.url, other.url]
            errors: list[str] = []

            def retrieves(url: str) -> None:
                for _ in range(50):
                    r = httpx.get(
                        f"{url}/openai/v1/batches/{batch.id}", headers={"api-key": key}, timeout=30
                    )
                    if r.status_code != 200:
                        errors.append(r.text)

            threads = [threading.Thread(target=retrieves, args=(u,)) for u in urls]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors[:2]
            done = httpx.get(
                f"{other.url}/openai/v1/batches/{batch.id}", headers={"api-key": key}
            ).json()
            assert done["status"] == "completed"
            output = sim.files[done["output_file_id"]][1].splitlines()
            usage = [json.loads(x)["response"]["body"]["usage"] for x in output]
            tokens_in = sum(u["input_tokens"] for u in usage)
            tokens_out = sum(u["output_tokens"] for u in usage)
            expected = (tokens_in * 1.2 + tokens_out * 3.0) / 1e6
            day = datetime.now(UTC).date().isoformat()
            rows = httpx.get(
                other.url + "/admin/usage",
                headers={"api-key": admin},
                params={"from": day, "to": day, "tenant": "team-a"},
            ).json()
            metrics = [httpx.get(u + "/metrics").text for u in urls]
    finally:
        again.stop()
    batch_rows = [r for r in rows if r["input_tokens"] == tokens_in]
    assert len(batch_rows) == 1, rows
    assert batch_rows[0]["output_tokens"] == tokens_out
    assert round(float(batch_rows[0]["cost"]), 6) == round(expected, 6)
    charged = cost = 0.0
    for text in metrics:
        for m in re.finditer(
            r'gateway_batch_charged_total\{[^}]*tenant="team-a"\} ([0-9.e+]+)', text
        ):
            charged += float(m.group(1))
        for m in re.finditer(r'gateway_cost_total\{[^}]*tenant="team-a"\} ([0-9.e+-]+)', text):
            cost += float(m.group(1))
    assert charged == 1.0  # one replica charged it, once
    assert round(cost, 6) == round(expected, 6)  # retrieves and lists cost nothing
