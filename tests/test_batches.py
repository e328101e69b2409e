"""Batch jobs: the input file checked line by line, batches owned per tenant, cost once."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from harness import GatewayProcess, Server, Sim, Tenants, base_config, gateway

from gateway.keys import hash_key, new_key
from gateway.simulator import IDENTITY_HEADER

PRICES = {"currency": "EUR", "input": 2.0, "cached_input": 0.5, "output": 8.0}
BATCH_DEPLOYMENT = "dep-41-batch"


def _config(sim: Sim, tenants: Tenants, admin: str) -> dict[str, Any]:
    cfg = base_config({"swc": sim}, tenants, prices={"gpt-4.1": PRICES})
    cfg["models"]["gpt-4.1"].append(
        {"resource": "swc", "deployment": BATCH_DEPLOYMENT, "batch": True}
    )
    cfg["models"]["o3-batch"] = [{"resource": "swc", "deployment": "dep-o3b", "batch": True}]
    cfg["tenants"]["team-a"]["models"].append("o3-batch")
    cfg["tenants"]["team-a"]["tools"] = {"allowed": ["function", "mcp"]}
    cfg["tenants"]["team-a"]["mcp"] = {
        "allowed_servers": ["https://mcp.example.com/*"],
        "require_approval": "always",
    }
    cfg["admin"] = {"key_sha256": hash_key(admin)}
    cfg["server"] = {"max_body_bytes": 256 * 1024}  # one line's limit too
    cfg["batches"] = {"poll_seconds": 0.2}
    return cfg


@pytest.fixture
def setup(identity: Sim, tenants: Tenants) -> Iterator[tuple[Server, Sim, str]]:
    identity.state.batch_seconds = 0.3
    identity.state.batch_deployments = frozenset({BATCH_DEPLOYMENT, "dep-o3b"})
    admin = new_key()
    with gateway(_config(identity, tenants, admin)) as gw:
        yield gw, identity, admin


def _line(n: int, body: dict[str, Any], url: str = "/v1/responses") -> bytes:
    return json.dumps({"custom_id": f"r{n}", "method": "POST", "url": url, "body": body}).encode()


def _jsonl(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _clients(gw: Server, key: str) -> list[openai.OpenAI]:
    return [
        openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0),
        openai.AzureOpenAI(
            azure_endpoint=gw.url, api_key=key, api_version="2025-04-01-preview", max_retries=0
        ),
    ]


def _wait_done(client: openai.OpenAI, bid: str) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(bid)
        if batch.status in ("completed", "failed", "cancelled"):
            return batch
        time.sleep(0.1)
    raise AssertionError("the batch did not finish")


def _ledger(gw: Server, admin: str, tenant: str) -> list[dict[str, Any]]:
    day = datetime.now(UTC).date().isoformat()
    r = httpx.get(
        gw.url + "/admin/usage",
        headers={"api-key": admin},
        params={"from": day, "to": day, "tenant": tenant},
    )
    assert r.status_code == 200, r.text
    return list(r.json())


def test_a_batch_job_end_to_end_with_both_clients(
    setup: tuple[Server, Sim, str], tenants: Tenants
) -> None:
    gw, sim, admin = setup
    total_in = total_out = 0
    for client in _clients(gw, tenants.key("team-a")):
        with client:
            lines = [_line(i, {"model": "gpt-4.1", "input": f"question {i}"}) for i in range(5)]
            upload = client.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
            # What Azure stored: the checked lines, model rewritten to the batch deployment.
            stored = sim.state.files[upload.id][1].splitlines()
            assert len(stored) == 5
            assert all(json.loads(s)["body"]["model"] == BATCH_DEPLOYMENT for s in stored)
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
            )
            assert batch.id in [b.id for b in client.batches.list()]
            done = _wait_done(client, batch.id)
            assert done.status == "completed" and done.output_file_id
            out = [
                json.loads(x) for x in client.files.content(done.output_file_id).read().splitlines()
            ]
            assert sorted(o["custom_id"] for o in out) == [f"r{i}" for i in range(5)]
            for o in out:
                usage = o["response"]["body"]["usage"]
                total_in += usage["input_tokens"]
                total_out += usage["output_tokens"]
            for _ in range(5):  # retrieves after completion charge nothing more
                client.batches.retrieve(batch.id)
    rows = _ledger(gw, admin, "team-a")
    assert len(rows) == 1
    row = rows[0]
    assert row["input_tokens"] == total_in and row["output_tokens"] == total_out
    expected = (total_in * 2.0 + total_out * 8.0) / 1e6 * 0.5  # batch_discount 0.5
    assert round(float(row["cost"]), 6) == round(expected, 6)
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_batch_charged_total{model="gpt-4.1",tenant="team-a"} 2.0' in metrics
    assert 'gateway_batch_lines_total{outcome="uploaded",tenant="team-a"} 10.0' in metrics


def test_interactive_traffic_never_reaches_a_batch_deployment(
    setup: tuple[Server, Sim, str], tenants: Tenants
) -> None:
    gw, sim, _ = setup
    key = tenants.key("team-a")
    sim.state.fail_queue[:] = [503] * 3  # the interactive target fails: no spill to batch
    r = httpx.post(
        gw.url + "/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "x"},
        headers={"api-key": key},
    )
    assert r.status_code == 503
    deployments = [json.loads(x.body).get("model") for x in sim.state.api_requests() if x.body]
    assert BATCH_DEPLOYMENT not in deployments
    only = httpx.post(
        gw.url + "/openai/v1/responses",
        json={"model": "o3-batch", "input": "x"},
        headers={"api-key": key},
    )
    assert only.status_code == 400 and only.json()["error"]["code"] == "model_batch_only"


def _upload(gw: Server, key: str, content: bytes) -> httpx.Response:
    return httpx.post(
        gw.url + "/openai/v1/files",
        headers={"api-key": key},
        files={"file": ("in.jsonl", content, "application/jsonl")},
        data={"purpose": "batch"},
        timeout=30,
    )


def test_line_checks(setup: tuple[Server, Sim, str], tenants: Tenants) -> None:
    gw, sim, _ = setup
    key = tenants.key("team-a")
    good = _line(1, {"model": "gpt-4.1", "input": "hi"})
    uploads_before = len(sim.state.files)

    def refused(lines: list[bytes], status: int, code: str, where: str) -> None:
        r = _upload(gw, key, _jsonl(lines))
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code, err
        assert err["message"].startswith(where) and (err["param"] or "").startswith(where)

    refused([good, b"{not json"], 400, "invalid_json", "line 2")
    refused(
        [good, good, _line(3, {"model": "o3", "input": "x"})],
        403,
        "model_not_allowed",
        "line 3",
    )
    tool = {"type": "web_search_preview"}
    refused(
        [_line(1, {"model": "gpt-4.1", "input": "x", "tools": [tool]})],
        403,
        "tool_not_allowed",
        "line 1",
    )
    mcp = {"type": "mcp", "server_label": "x", "server_url": "https://evil.example.net/mcp"}
    refused(
        [_line(1, {"model": "gpt-4.1", "input": "x", "tools": [mcp]})],
        403,
        "mcp_server_not_allowed",
        "line 1",
    )
    foreign = "file-" + "b" * 24
    refused(
        [
            good,
            _line(2, {"model": "gpt-4.1", "input": [{"type": "input_file", "file_id": foreign}]}),
        ],
        404,
        "not_found",
        "line 2",
    )
    refused(
        [good, _line(2, {"model": "o3-batch", "input": "x"})],
        400,
        "mixed_batch_deployments",
        "line 2",
    )
    dup = (
        b'{"custom_id":"a","method":"POST","url":"/v1/responses",'
        b'"body":{"model":"gpt-4.1","model":"o3"}}'
    )
    refused([dup], 400, "duplicate_key", "line 1")
    refused(
        [_line(1, {"model": "gpt-4.1"}, url="/v1/images/generations")],
        400,
        "invalid_batch_line",
        "line 1",
    )
    for purpose in ("Batch", " batch"):  # read another way upstream, never unchecked
        r = httpx.post(
            gw.url + "/openai/v1/files",
            headers={"api-key": key},
            files={"file": ("in.jsonl", b"{}\n", "application/jsonl")},
            data={"purpose": purpose},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    before = len(sim.state.requests)
    as_json = httpx.post(  # another Content-Type: never an unchecked batch file
        gw.url + "/openai/v1/files",
        headers={"api-key": key},
        json={"purpose": "batch", "file": _jsonl([good]).decode()},
    )
    assert as_json.status_code == 400 and as_json.json()["error"]["param"] == "purpose"
    assert len(sim.state.requests) == before
    empty = _upload(gw, key, b"\n\n")
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_batch_file"
    huge = _line(1, {"model": "gpt-4.1", "input": "x" * (300 * 1024)})
    big = _upload(gw, key, _jsonl([good, huge]))
    assert big.status_code == 413 and big.json()["error"]["message"].startswith("line 2")
    assert len(sim.state.files) == uploads_before  # nothing was stored upstream
    # The MCP policy's rewrite reaches the stored line.
    ok_mcp = {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example.com/a"}
    r = _upload(gw, key, _jsonl([_line(1, {"model": "gpt-4.1", "input": "x", "tools": [ok_mcp]})]))
    assert r.status_code == 200, r.text
    stored = json.loads(sim.state.files[r.json()["id"]][1])
    assert stored["body"]["tools"][0]["require_approval"] == "always"


def test_another_tenant_sees_nothing(setup: tuple[Server, Sim, str], tenants: Tenants) -> None:
    gw, _, _ = setup
    a, b = tenants.key("team-a"), tenants.key("team-b")
    with openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=a, max_retries=0) as client:
        fails = json.dumps(
            {
                "custom_id": "sim-fail-1",
                "method": "POST",
                "url": "/v1/responses",
                "body": {"model": "gpt-4.1", "input": "y"},
            }
        ).encode()
        upload = client.files.create(
            file=("in.jsonl", _jsonl([_line(1, {"model": "gpt-4.1", "input": "x"}), fails])),
            purpose="batch",
        )
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
        )
        done = _wait_done(client, batch.id)
        assert done.error_file_id and done.output_file_id
        errors = client.files.content(done.error_file_id).read()  # the owner can read it
        assert b"sim-fail-1" in errors
    h = {"api-key": b}
    v1 = gw.url + "/openai/v1"
    for path in (
        f"/batches/{batch.id}",
        f"/files/{upload.id}",
        f"/files/{done.output_file_id}",
        f"/files/{done.output_file_id}/content",
        f"/files/{done.error_file_id}",
        f"/files/{done.error_file_id}/content",
    ):
        assert httpx.get(v1 + path, headers=h).status_code == 404, path
    assert httpx.post(v1 + f"/batches/{batch.id}/cancel", headers=h).status_code == 404
    assert batch.id not in httpx.get(v1 + "/batches", headers=h).text
    theirs = httpx.post(
        v1 + "/batches",
        headers=h,
        json={"input_file_id": upload.id, "endpoint": "/v1/responses", "completion_window": "24h"},
    )
    assert theirs.status_code == 404


def test_cancel(setup: tuple[Server, Sim, str], tenants: Tenants) -> None:
    gw, sim, _ = setup
    sim.state.batch_seconds = 30
    with openai.OpenAI(
        base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0
    ) as client:
        upload = client.files.create(
            file=("in.jsonl", io.BytesIO(_jsonl([_line(1, {"model": "gpt-4.1", "input": "x"})]))),
            purpose="batch",
        )
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
        )
        assert client.batches.cancel(batch.id).status == "cancelling"


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_200_mb_batch_file_is_checked_as_it_streams(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    """The file is never held whole: the gateway's peak memory barely moves while a
    200 MB file of 25,000 lines is uploaded, checked line by line and sent on."""
    identity.state.batch_deployments = frozenset({BATCH_DEPLOYMENT})
    cfg = _config(identity, tenants, new_key())
    env = {"IDENTITY_ENDPOINT": f"{identity.url}/msi/token", "IDENTITY_HEADER": IDENTITY_HEADER}
    path = tmp_path / "big.jsonl"
    filler = "lorem ipsum " * 700  # ~8 KB of input per line
    with open(path, "wb") as f:
        for i in range(25_000):
            f.write(_line(i, {"model": "gpt-4.1", "input": f"{i} {filler}"}) + b"\n")
    size = path.stat().st_size
    assert size > 200_000_000
    gw = GatewayProcess(cfg, str(tmp_path), env).start()
    try:
        assert gw.proc is not None
        pid = gw.proc.pid
        # Warm the request path up so the peak below is about the file, not imports.
        small = _upload_to(
            gw.url, tenants.key("team-a"), _jsonl([_line(1, {"model": "gpt-4.1", "input": "x"})])
        )
        assert small.status_code == 200, small.text
        before = _rss_kib(pid)
        with open(path, "rb") as f:
            r = httpx.post(
                gw.url + "/openai/v1/files",
                headers={"api-key": tenants.key("team-a")},
                files={"file": ("big.jsonl", f, "application/jsonl")},
                data={"purpose": "batch"},
                timeout=300,
            )
        peak = _peak_rss_kib(pid)
    finally:
        gw.stop()
    assert r.status_code == 200, r.text[:300]
    stored = identity.state.files[r.json()["id"]][1]
    assert stored.count(b"\n") == 25_000 and b'"model":"dep-41-batch"' in stored[:20_000]
    grew = (peak - before) / 1024
    print(f"200 MB batch file: gateway RSS {before / 1024:.0f} MiB, peak +{grew:.1f} MiB")
    assert grew < 48, f"the gateway's memory grew {grew:.0f} MiB for a {size >> 20} MiB file"


def _upload_to(url: str, key: str, content: bytes) -> httpx.Response:
    return httpx.post(
        url + "/openai/v1/files",
        headers={"api-key": key},
        files={"file": ("in.jsonl", content, "application/jsonl")},
        data={"purpose": "batch"},
        timeout=30,
    )


def test_the_watcher_charges_a_batch_nobody_retrieves(
    setup: tuple[Server, Sim, str], tenants: Tenants
) -> None:
    gw, _, admin = setup
    with openai.OpenAI(
        base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0
    ) as client:
        upload = client.files.create(
            file=("in.jsonl", _jsonl([_line(1, {"model": "gpt-4.1", "input": "x"})])),
            purpose="batch",
        )
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
        )
    deadline = time.monotonic() + 10  # completes after 0.3 s; the watcher polls every 0.2 s
    while time.monotonic() < deadline and not _ledger(gw, admin, "team-a"):
        time.sleep(0.1)
    rows = _ledger(gw, admin, "team-a")
    assert len(rows) == 1 and rows[0]["requests"] == 1 and rows[0]["input_tokens"] > 0


def test_a_batch_the_budget_cannot_cover_is_refused(identity: Sim, tenants: Tenants) -> None:
    cfg = _config(identity, tenants, new_key())
    cfg["tenants"]["team-a"]["budgets"] = {"currency": "EUR", "per_day": 0.000001}
    with (
        gateway(cfg) as gw,
        openai.OpenAI(
            base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0
        ) as client,
    ):
        text = "many words " * 2000
        upload = client.files.create(
            file=("in.jsonl", _jsonl([_line(1, {"model": "gpt-4.1", "input": text})])),
            purpose="batch",
        )
        with pytest.raises(openai.RateLimitError) as err:
            client.batches.create(
                input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
            )
    assert err.value.code == "budget_exceeded" and "day budget" in err.value.message
    assert identity.state.batches == {}  # nothing reached Azure


def test_a_charge_that_fails_does_not_fail_the_retrieve(identity: Sim, tenants: Tenants) -> None:
    """Azure fails the output download: the client still gets its batch, and the next
    retrieve charges it (once)."""
    identity.state.batch_seconds = 0.2
    admin = new_key()
    cfg = _config(identity, tenants, admin)
    cfg["batches"] = {"poll_seconds": 3600}  # no watcher in the way: retrieves only
    with (
        gateway(cfg) as gw,
        openai.OpenAI(
            base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0
        ) as client,
    ):
        upload = client.files.create(
            file=("in.jsonl", _jsonl([_line(1, {"model": "gpt-4.1", "input": "x"})])),
            purpose="batch",
        )
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
        )
        time.sleep(0.4)
        identity.state.fail_queue[:] = [0, 500]  # the retrieve passes, the download fails
        assert client.batches.retrieve(batch.id).status == "completed"
        assert _ledger(gw, admin, "team-a") == []
        client.batches.retrieve(batch.id)
        rows = _ledger(gw, admin, "team-a")
        client.batches.retrieve(batch.id)
        assert rows == _ledger(gw, admin, "team-a") and rows[0]["requests"] == 1


def test_a_charged_batch_spends_the_budget(identity: Sim, tenants: Tenants) -> None:
    """The batch's cost lands in the budget's money counters: once it is charged, the
    tenant's interactive requests meet the spent day budget."""
    identity.state.batch_seconds = 0.2
    cfg = _config(identity, tenants, new_key())
    cfg["prices"]["gpt-4.1"] = {"currency": "EUR", "input": 2.0, "output": 800.0}
    cfg["tenants"]["team-a"]["budgets"] = {"currency": "EUR", "per_day": 0.001}
    key = tenants.key("team-a")
    with (
        gateway(cfg) as gw,
        openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0) as client,
    ):
        upload = client.files.create(
            file=("in.jsonl", _jsonl([_line(1, {"model": "gpt-4.1", "input": "x"})])),
            purpose="batch",
        )  # input estimate ~30 tokens at 1 EUR/1M: fits the budget
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h"
        )
        done = _wait_done(client, batch.id)  # charged: 5 output tokens at 400 EUR/1M
        assert done.status == "completed"
        with pytest.raises(openai.RateLimitError) as err:
            client.responses.create(model="gpt-4.1", input="x")
    assert "budget" in err.value.message


def test_mcp_in_batch_lines_is_audited_before_the_upload(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    """Azure runs a batch's MCP tools later: their records are durable before the file
    goes up, each naming its line and custom_id, the tools' secrets never written."""
    audit = tmp_path / "audit.jsonl"
    cfg = _config(identity, tenants, new_key())
    cfg["audit"] = {"path": str(audit)}
    on_disk: list[bool] = []

    def check(rec: Any) -> None:
        if rec.path.endswith("/files") and rec.method == "POST":
            text = audit.read_text() if audit.exists() else ""
            on_disk.append('"event":"mcp.tool"' in text and '"custom_id":"with-mcp"' in text)

    identity.state.on_request = check
    secret = "Bearer mcp-secret-in-a-batch-line"
    tool = {
        "type": "mcp",
        "server_label": "docs",
        "server_url": "https://mcp.example.com/docs",
        "require_approval": "never",
        "headers": {"Authorization": secret},
    }
    line = json.dumps(
        {
            "custom_id": "with-mcp",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": "gpt-4.1", "input": "x", "tools": [tool]},
        }
    ).encode()
    with gateway(cfg) as gw:
        r = _upload(
            gw, tenants.key("team-a"), _jsonl([_line(1, {"model": "gpt-4.1", "input": "y"}), line])
        )
    assert r.status_code == 200, r.text
    assert on_disk == [True]
    text = audit.read_text()
    assert secret not in text
    recs = [json.loads(x) for x in text.splitlines()]
    tools = [x for x in recs if x["event"] == "mcp.tool"]
    assert len(tools) == 1 and tools[0]["batch_line"] == 2
    assert tools[0]["require_approval"] == "always" and tools[0]["header_names"] == [
        "Authorization"
    ]
    assert any(x["event"] == "mcp.policy" and x["batch_line"] == 2 for x in recs)
