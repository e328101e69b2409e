"""Realtime under the one rulebook: responses the upstream starts by itself (server VAD)
are admitted when announced; every documented client event is parsed strictly and
checked whole (ids, case-variant keys, tools, MCP servers, models); handshakes are built
from what was checked; MCP tools and approvals are audited before they go up."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from harness import Server, Sim, Tenants, base_config, gateway

PRICES = {"currency": "EUR", "input": 1.0, "output": 4.0}
SPEECH = base64.b64encode(b"\x01\x02" * 160).decode()
SILENCE = base64.b64encode(b"\x00" * 320).decode()
HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def _url(gw: Server, query: str = "model=gpt-4o-mini", path: str = "/openai/v1/realtime") -> str:
    return gw.url.replace("http://", "ws://") + path + "?" + query


async def _open(gw: Server, key: str, query: str = "model=gpt-4o-mini") -> Any:
    ws = await websockets.connect(_url(gw, query), additional_headers={"api-key": key})
    assert json.loads(await ws.recv())["type"] == "session.created"
    return ws


async def _turn(ws: Any) -> None:
    """One spoken turn: speech, then silence (the simulator's server VAD ends the turn)."""
    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": SPEECH}))
    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": SILENCE}))


async def _until(ws: Any, kinds: set[str]) -> list[dict[str, Any]]:
    """Events up to and including the first of ``kinds``."""
    out = []
    while True:
        out.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        if out[-1]["type"] in kinds:
            return out


def _metric(text: str, prefix: str) -> float:
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))


def _quiet_metrics(gw: Server) -> str:
    """The metrics once every exchange has ended (sockets end a moment after the client
    closes); fails when one never does."""
    deadline = time.monotonic() + 3
    while "gateway_inflight_requests 0.0" not in (text := httpx.get(gw.url + "/metrics").text):
        assert time.monotonic() < deadline, "an exchange never ended"
        time.sleep(0.05)
    return text


def _vad_config(sim: Sim, tenants: Tenants, tmp_path: Path, tpm: int) -> dict[str, Any]:
    cfg = base_config(
        {"swc": sim},
        tenants,
        prices={"gpt-4o-mini": PRICES},
        audit={"path": str(tmp_path / "audit.jsonl")},
    )
    cfg["tenants"]["team-a"]["quotas"] = {"tokens_per_minute": tpm}
    return cfg


def test_a_server_started_response_is_admitted_metered_and_audited(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    """Under the limit, a turn that server VAD ends starts a response the client never
    asked for: it is admitted when announced, metered and logged like a response.create."""
    with gateway(_vad_config(identity, tenants, tmp_path, 10_000)) as gw:

        async def run() -> list[dict[str, Any]]:
            async with await _open(gw, tenants.key("team-a")) as ws:
                await _turn(ws)
                return await _until(ws, {"response.done"})

        events = asyncio.run(run())
        metrics = _quiet_metrics(gw)
    assert identity.state.realtime_started and identity.state.realtime_cancelled == []
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.speech_stopped" in kinds and "response.created" in kinds
    assert events[-1]["response"]["status"] == "completed"
    # Settled: 12 input and 18 output tokens at the tenant's prices, one request.
    tenant = 'tenant="team-a"'
    assert (
        _metric(metrics, f'gateway_tokens_total{{kind="input",model="gpt-4o-mini",{tenant}}}') == 12
    )
    cost = _metric(
        metrics, 'gateway_cost_total{currency="EUR",model="gpt-4o-mini",tenant="team-a"}'
    )
    assert cost == pytest.approx((12 * 1 + 18 * 4) / 1e6)
    requests = 'gateway_requests_total{model="gpt-4o-mini",operation="create",status="200",'
    assert _metric(metrics, requests + tenant + ',transport="websocket"}') == 1


def test_a_server_started_response_over_the_limit_is_cancelled_and_settled(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    """Over the token limit (the first turn spent it), the next turn's response is refused
    when announced: cancelled upstream at once, none of its events reach the client, the
    client gets the refusal as an error event, and what it used is still charged."""
    identity.state.realtime_deltas = 6
    identity.state.realtime_delta_seconds = 0.05
    with gateway(_vad_config(identity, tenants, tmp_path, 20)) as gw:

        async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            async with await _open(gw, tenants.key("team-a")) as ws:
                await _turn(ws)
                first = await _until(ws, {"response.done"})  # 54 tokens: over the 20
                await _turn(ws)
                second = await _until(ws, {"error"})
                await asyncio.sleep(0.5)  # the cancelled response ends upstream meanwhile
                # The socket stays open and serves.
                await ws.send(json.dumps({"type": "session.update", "session": {}}))
                later = await _until(ws, {"session.updated"})
                assert all(e["type"] != "response.created" for e in later), later
                return first, second

        first, second = asyncio.run(run())
        metrics = _quiet_metrics(gw)
    refused = second[-1]["error"]
    assert refused["code"] == "rate_limit_exceeded" and "tokens_per_minute" in refused["message"]
    assert [e["type"] for e in second if e["type"].startswith("response.")] == []
    started = identity.state.realtime_started
    assert len(started) == 2 and identity.state.realtime_cancelled == [started[1]]
    assert first[-1]["response"]["id"] == started[0]
    # The cancelled response's input (12) is charged beside the first one's.
    tenant = 'tenant="team-a"'
    assert (
        _metric(metrics, f'gateway_tokens_total{{kind="input",model="gpt-4o-mini",{tenant}}}') == 24
    )
    refusals = f'gateway_quota_refusals_total{{reason="tokens_per_minute",{tenant}}}'
    assert _metric(metrics, refusals) == 1


def test_client_events_are_checked_whole_and_strictly(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    """Every documented event type goes through the rulebook; anything else, any
    spelling that differs, any foreign id or model is refused with an error event, and
    nothing of it reaches Azure."""
    cfg = base_config({"swc": identity}, tenants)
    cfg["tenants"]["team-a"]["mcp"] = {"allowed_servers": ["https://mcp.example.com/*"]}
    with gateway(cfg) as gw:
        other = httpx.post(
            gw.url + "/openai/v1/files",
            files={"file": ("x.txt", b"hello")},
            data={"purpose": "assistants"},
            headers={"api-key": tenants.key("team-b")},
        ).json()["id"]
        mcp_bad = {"type": "mcp", "server_label": "e", "server_url": "https://evil.example/mcp"}
        cases: list[tuple[str, str, str | None]] = [
            ('{"type": "session.updat", "session": {}}', "unknown_event_type", "type"),
            (
                '{"type": "session.update", "session": {"Tools": []}}',
                "invalid_key_case",
                "session.Tools",
            ),
            (
                '{"type": "session.update", "session": {}, "session": {"x": 1}}',
                "duplicate_key",
                "session",
            ),
            (
                '{"type": "input_audio_buffer.commit", "n": 123456789012345678901234}',
                "number_out_of_range",
                None,
            ),
            (
                json.dumps({"type": "session.update", "session": {"model": "o3"}}),
                "model_not_allowed",
                "session.model",
            ),
            (
                json.dumps(
                    {
                        "type": "transcription_session.update",
                        "session": {"input_audio_transcription": {"model": "o3"}},
                    }
                ),
                "model_not_allowed",
                "session.input_audio_transcription.model",
            ),
            (
                json.dumps({"type": "response.create", "response": {"tools": [mcp_bad]}}),
                "mcp_server_not_allowed",
                "response.tools[0]",
            ),
            (
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_file", "file_id": other}],
                        },
                    }
                ),
                "not_found",
                "item.content[0].file_id",
            ),
            (
                json.dumps(
                    {
                        "type": "response.create",
                        "response": {"metadata": 1, "previous_response_id": "resp_" + "a" * 24},
                    }
                ),
                "not_found",
                "response.previous_response_id",
            ),
        ]

        async def run() -> None:
            async with await _open(gw, tenants.key("team-a")) as ws:
                for text, code, param in cases:
                    await ws.send(text)
                    error = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    assert error["type"] == "error", (text, error)
                    assert error["error"]["code"] == code, (text, error)
                    if param is not None:
                        assert error["error"]["param"] == param, (text, error)
                # Still open and serving a good event, which goes up as checked.
                update = {"type": "session.update", "session": {"model": "gpt-4o-mini"}}
                await ws.send(json.dumps(update))
                assert (await _until(ws, {"session.updated"}))[-1]["type"] == "session.updated"

        asyncio.run(run())
    frames = [json.loads(f) for f in identity.state.ws_frames]
    assert frames == [{"type": "session.update", "session": {"model": "dep-4om-swc"}}]


def test_responses_socket_frames_are_strict_too(gw: Server, sim: Sim, tenants: Tenants) -> None:
    async def run() -> None:
        url = gw.url.replace("http://", "ws://") + "/openai/v1/responses"
        async with websockets.connect(
            url, additional_headers={"api-key": tenants.key("team-a")}
        ) as ws:
            for text, code in (
                ('{"type": "response.cancel"}', "unknown_event_type"),
                (
                    '{"type": "response.create", "model": "gpt-4.1", "Tools": []}',
                    "invalid_key_case",
                ),
                ('{"type": "response.create", "model": "gpt-4.1", "model": "o3"}', "duplicate_key"),
            ):
                await ws.send(text)
                error = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert error["type"] == "error" and error["error"]["code"] == code, error

    asyncio.run(run())
    assert sim.state.ws_frames == []


def _status(gw: Server, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers={**HANDSHAKE, **headers})
        r = conn.getresponse()
        return r.status, (json.loads(r.read()) if r.status != 101 else {})
    finally:
        conn.close()


def test_handshakes_are_built_from_what_was_checked(gw: Server, sim: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    for path, status, code in (
        ("/openai/v1/realtime?model=gpt-4o-mini&deployment=o3", 400, "unknown_parameter"),
        ("/openai/v1/realtime?model=gpt-4o-mini&Model=o3", 400, "unknown_parameter"),
        ("/openai/v1/realtime?model=gpt-4o-mini&model=o3", 400, "duplicate_parameter"),
        ("/openai/v1/realtime?model=gpt-4o-mini&intent=conversation", 400, "invalid_value"),
        (
            "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-mini&model=o3",
            400,
            "unknown_parameter",
        ),
        ("/openai/realtime?deployment=gpt-4o-mini", 400, "missing_api_version"),
        ("/openai/v1/responses?model=o3", 400, "unknown_parameter"),
        (f"/openai/v1/responses?api-key={key}", 401, "key_not_accepted_here"),
    ):
        got, body = _status(gw, path, {"api-key": key})
        assert (got, body["error"]["code"]) == (status, code), path
    # A key in the browser subprotocol: Realtime only.
    got, body = _status(
        gw,
        "/openai/v1/responses",
        {"Sec-WebSocket-Protocol": f"openai-insecure-api-key.{key}"},
    )
    assert (got, body["error"]["code"]) == (401, "key_not_accepted_here")
    assert [r for r in sim.state.requests if r.method == "WEBSOCKET"] == []
    # What goes up: the deployment and the checked parameters, nothing else.
    got, _ = _status(
        gw, "/openai/v1/realtime?model=gpt-4o-mini&intent=transcription", {"api-key": key}
    )
    assert got == 101
    deadline = time.monotonic() + 3
    while not (up := [r for r in sim.state.requests if r.method == "WEBSOCKET"]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert up[0].query == "intent=transcription&model=dep-4om-swc"


def test_mcp_on_realtime_is_audited_before_it_goes_up(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    """Tools in a response.create and approvals in a conversation.item.create are records
    in the audit trail before Azure sees them; when the trail cannot be written, the
    event is refused (audit_unavailable) and nothing goes up."""
    audit = tmp_path / "audit.jsonl"
    cfg = base_config({"swc": identity}, tenants, audit={"path": str(audit)})
    mcp = {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example.com/x"}
    approval = {
        "type": "conversation.item.create",
        "item": {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True},
    }
    with gateway(cfg) as gw:

        async def run() -> None:
            async with await _open(gw, tenants.key("team-a")) as ws:
                await ws.send(json.dumps({"type": "response.create", "response": {"tools": [mcp]}}))
                await _until(ws, {"response.done"})
                await ws.send(json.dumps(approval))
                await _until(ws, {"conversation.item.created"})

        asyncio.run(run())
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert "mcp.tool" in events and "mcp.approval" in events
    tool = next(r for r in records if r["event"] == "mcp.tool")
    assert tool["server_url"] == "https://mcp.example.com/x" and tool["tenant"] == "team-a"
    assert next(r for r in records if r["event"] == "mcp.approval")["approve"] is True

    # A trail that cannot be written: the event is refused, nothing goes up.
    frames_before = len(identity.state.ws_frames)
    cfg["audit"] = {"path": str(tmp_path)}  # a directory: every write fails
    with gateway(cfg) as gw:

        async def refused() -> dict[str, Any]:
            async with await _open(gw, tenants.key("team-a")) as ws:
                await ws.send(json.dumps(approval))
                return dict(json.loads(await asyncio.wait_for(ws.recv(), 5)))

        error = asyncio.run(refused())
    assert error["type"] == "error" and error["error"]["code"] == "audit_unavailable"
    assert len(identity.state.ws_frames) == frames_before


def test_an_upstream_error_about_a_create_ends_that_create_only(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    """Two response.create events without ids, the second while the first runs: Azure
    refuses the second (busy) with an error naming its event_id, which the gateway gave it;
    that admission ends, the first response completes and is settled on its own."""
    identity.state.realtime_deltas = 4
    identity.state.realtime_delta_seconds = 0.05
    with gateway(_vad_config(identity, tenants, tmp_path, 10_000)) as gw:

        async def run() -> list[dict[str, Any]]:
            async with await _open(gw, tenants.key("team-a")) as ws:
                await ws.send(json.dumps({"type": "response.create"}))
                await ws.send(json.dumps({"type": "response.create"}))
                return await _until(ws, {"response.done"})

        events = asyncio.run(run())
        metrics = _quiet_metrics(gw)
    sent = [json.loads(f) for f in identity.state.ws_frames]
    ids = [f["event_id"] for f in sent if f["type"] == "response.create"]
    assert len(ids) == 2 and len(set(ids)) == 2
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["conversation_already_has_active_response"]
    assert errors[0]["event_id"] == ids[1]
    assert events[-1]["response"]["status"] == "completed"
    tenant = 'tenant="team-a",transport="websocket"}'
    ok = 'gateway_requests_total{model="gpt-4o-mini",operation="create",status="200",'
    refused = 'gateway_requests_total{model="gpt-4o-mini",operation="create",status="400",'
    assert _metric(metrics, ok + tenant) == 1 and _metric(metrics, refused + tenant) == 1
