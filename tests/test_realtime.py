"""Realtime through the gateway: the real clients, the model and the transcription model
rewritten to deployments, MCP policy and audit in session.update, keys in the query or
the browser subprotocol never logged, binary frames relayed, usage counted."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
from pathlib import Path

import httpx
import openai
import pytest
import websockets
from harness import Server, Sim, Tenants, base_config, gateway


def _ws(gw: Server) -> str:
    return gw.url.replace("http://", "ws://")


def test_realtime_with_the_openai_client(gw: Server, sim: Sim, tenants: Tenants) -> None:
    c = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0)
    with c.realtime.connect(model="gpt-4o-mini") as conn:
        assert conn.recv().type == "session.created"
        transcription = {"input": {"transcription": {"model": "gpt-4.1"}}}
        conn.session.update(session={"type": "realtime", "audio": transcription})  # type: ignore[typeddict-item]
        assert conn.recv().type == "session.updated"
        conn.response.create()
        kinds = []
        while True:
            event = conn.recv()
            kinds.append(event.type)
            if event.type == "response.done":
                assert event.response.usage is not None
                assert event.response.usage.total_tokens == 30
                break
    # The upstream saw deployments only: in the URL, and in session.update.
    handshake = [r for r in sim.state.requests if r.method == "WEBSOCKET"][-1]
    assert handshake.path == "/openai/v1/realtime" and handshake.query == "model=dep-4om-swc"
    assert handshake.headers["authorization"].startswith("Bearer sim-token-")
    update = json.loads(sim.state.ws_frames[0])
    assert update["session"]["audio"]["input"]["transcription"]["model"] == "dep-41-swc"
    assert kinds[0] == "response.created" and kinds[-1] == "response.done"
    assert "response.output_text.delta" in kinds


def test_realtime_with_the_azure_client(gw: Server, sim: Sim, tenants: Tenants) -> None:
    az = openai.AzureOpenAI(
        azure_endpoint=gw.url,
        api_key=tenants.key("team-a"),
        api_version="2025-04-01-preview",
        websocket_base_url=_ws(gw) + "/openai",
        max_retries=0,
    )
    with az.realtime.connect(model="gpt-4o-mini") as conn:
        assert conn.recv().type == "session.created"
    handshake = [r for r in sim.state.requests if r.method == "WEBSOCKET"][-1]
    assert handshake.path == "/openai/realtime"
    assert "deployment=dep-4om-swc" in handshake.query and "api-version=" in handshake.query
    assert "api-key" not in handshake.query


def test_refusals_at_the_handshake_and_per_frame(gw: Server, sim: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-b")  # allowed gpt-4.1 only

    async def run() -> None:
        url = _ws(gw) + "/openai/v1/realtime?model=gpt-4o-mini"
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url, additional_headers={"api-key": key}):
                pass
        assert info.value.response.status_code == 403
        assert b"model_not_allowed" in info.value.response.body
        url = _ws(gw) + "/openai/v1/realtime?model=gpt-4.1"
        async with websockets.connect(url, additional_headers={"api-key": key}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            bad = {
                "type": "session.update",
                "session": {"input_audio_transcription": {"model": "o3"}},
            }
            await ws.send(json.dumps(bad))
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error["error"]["code"] == "model_not_allowed"
            # Realtime defines no binary frames: the socket is closed (1003), none goes up.
            await ws.send(b"\x00\x01audio")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003

    asyncio.run(run())
    assert all("o3" not in f for f in sim.state.ws_frames)


def test_keys_in_query_or_subprotocol_never_logged(
    gw: Server, sim: Sim, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = tenants.key("team-a")

    async def run() -> None:
        url = _ws(gw) + f"/openai/v1/realtime?model=gpt-4.1&api-key={key}"
        async with websockets.connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        url = _ws(gw) + "/openai/v1/realtime?model=gpt-4.1"
        protocols = ["realtime", f"openai-insecure-api-key.{key}"]
        async with websockets.connect(url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "session.created"
        # Two different keys: refused.
        other = tenants.key("team-b")
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(
                url + f"&api-key={other}", additional_headers={"api-key": key}
            ):
                pass
        assert info.value.response.status_code == 401

    asyncio.run(run())
    handshakes = [r for r in sim.state.requests if r.method == "WEBSOCKET"]
    assert len(handshakes) == 2 and all(key not in r.query for r in handshakes)
    assert all(key not in json.dumps(r.headers) for r in handshakes)
    # The server side's lines (the test's own websockets client logs what it sends).
    server_lines = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    leaked = [r.name for r in server_lines if key in r.getMessage() or key in str(r.__dict__)]
    assert leaked == []


def test_mcp_in_session_update_and_usage_counted(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    cfg = base_config(
        {"swc": identity},
        tenants,
        audit={"path": str(tmp_path / "a.jsonl")},
        prices={
            "gpt-4o-mini": {
                "currency": "EUR",
                "input": 1,
                "output": 4,
                "audio_input": 10,
                "audio_output": 20,
            }
        },
    )
    cfg["tenants"]["team-a"]["mcp"] = {"require_approval": "always"}
    cfg["tenants"]["team-a"]["quotas"] = {"max_concurrent_requests": 1}
    mcp = {"type": "mcp", "server_label": "d", "server_url": "https://mcp.example/sse"}
    with gateway(cfg) as gw:
        key = tenants.key("team-a")

        async def run() -> None:
            url = _ws(gw) + "/openai/v1/realtime?model=gpt-4o-mini"
            async with websockets.connect(url, additional_headers={"api-key": key}) as ws:
                await ws.recv()
                # One slot per connection: a second one is refused at the handshake.
                host, port = gw.url.removeprefix("http://").split(":")
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
                conn.request(
                    "GET",
                    "/openai/v1/realtime?model=gpt-4o-mini",
                    headers={
                        "api-key": key,
                        "Upgrade": "websocket",
                        "Connection": "Upgrade",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                        "Sec-WebSocket-Version": "13",
                    },
                )
                assert conn.getresponse().status == 429
                conn.close()
                await ws.send(json.dumps({"type": "session.update", "session": {"tools": [mcp]}}))
                await ws.recv()
                await ws.send(json.dumps({"type": "response.create"}))
                while json.loads(await ws.recv())["type"] != "response.done":
                    pass

        asyncio.run(run())
        metrics = httpx.get(gw.url + "/metrics").text
    sent = json.loads(identity.state.ws_frames[0])
    assert sent["session"]["tools"][0]["require_approval"] == "always"
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert {"mcp.policy", "mcp.tool"} <= {r["event"] for r in records}
    # The simulator's usage: input 4 text + 8 audio, output 6 text + 12 audio.
    cost = 'gateway_cost_total{currency="EUR",model="gpt-4o-mini",tenant="team-a"} '
    line = next(ln for ln in metrics.splitlines() if ln.startswith(cost))
    assert float(line.split()[-1]) == pytest.approx((4 + 8 * 10 + 6 * 4 + 12 * 20) / 1e6)
    assert "gateway_inflight_requests 0.0" in metrics


def test_the_tenants_tool_types_apply_to_realtime(identity: Sim, tenants: Tenants) -> None:
    """The tool-type allowlist holds on a Realtime socket as on HTTP: an MCP tool in a
    session.update or a response.create of a tenant allowed only functions is refused
    with an error frame and never reaches Azure."""
    cfg = base_config({"swc": identity}, tenants)
    cfg["tenants"]["team-a"]["tools"] = {"allowed": ["function"]}
    mcp = {"type": "mcp", "server_label": "d", "server_url": "https://mcp.example/sse"}
    with gateway(cfg) as gw:

        async def run() -> None:
            url = _ws(gw) + "/openai/v1/realtime?model=gpt-4o-mini"
            headers = {"api-key": tenants.key("team-a")}
            async with websockets.connect(url, additional_headers=headers) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
                for frame in (
                    {"type": "session.update", "session": {"tools": [mcp]}},
                    {"type": "response.create", "response": {"tools": [mcp]}},
                ):
                    await ws.send(json.dumps(frame))
                    error = json.loads(await ws.recv())
                    assert error["type"] == "error", error
                    assert error["error"]["code"] == "tool_not_allowed"

        asyncio.run(run())
    assert all("mcp.example" not in f for f in identity.state.ws_frames)
