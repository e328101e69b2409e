"""WebSockets: the Responses WebSocket mode through the gateway with the real clients,
every frame checked like an HTTP create; 426 (never 405 or 404) where no socket is
served, so clients fall back to HTTP at once."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets
from harness import Server, Sim, Tenants, base_config, gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
    "OpenAI-Beta": "responses_websockets=2026-02-06",
}


def _handshake(gw: Server, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read() if r.status != 101 else b""
    finally:
        conn.close()


def _client(gw: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0)


def _events_until_end(conn: Any) -> list[Any]:
    out = []
    for event in conn:
        out.append(event)
        if event.type in ("response.completed", "response.failed", "error"):
            return out
    return out


@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/chat/completions",
        "/openai/v1/files",
        "/openai/responses",  # the preview form needs its api-version
        "/healthz",
    ],
)
def test_upgrade_where_no_socket_is_served_is_426(
    gw: Server, sim: Sim, tenants: Tenants, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    key = tenants.key("team-a")
    status, raw = _handshake(gw, path, {**HANDSHAKE, "Authorization": f"Bearer {key}"})
    assert status == 426
    error = json.loads(raw)["error"]
    assert error["code"] == "websocket_not_served" and "HTTP" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert sim.state.api_requests() == [] and sim.state.ws_frames == []
    deadline = time.monotonic() + 3  # the access line is written after the answer is sent
    while not (lines := [r for r in caplog.records if r.name == "gateway.access"]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.01)
    assert getattr(lines[-1], "transport", None) == "websocket"
    assert getattr(lines[-1], "tenant", None) == "team-a"
    assert getattr(lines[-1], "status", None) == 426
    assert key not in caplog.text


def test_a_plain_get_is_still_405(gw: Server, tenants: Tenants) -> None:
    status, raw = _handshake(gw, "/openai/v1/responses", {"api-key": tenants.key("team-a")})
    assert status == 405 and json.loads(raw)["error"]["code"] == "method_not_allowed"


def test_handshake_needs_a_key(gw: Server) -> None:
    status, raw = _handshake(gw, "/openai/v1/responses", HANDSHAKE)
    assert status == 401 and json.loads(raw)["error"]["code"] == "missing_api_key"
    status, raw = _handshake(gw, "/openai/v1/responses", {**HANDSHAKE, "api-key": "gk-nope"})
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"


def test_responses_socket_with_the_openai_client(gw: Server, sim: Sim, tenants: Tenants) -> None:
    a = _client(gw, tenants.key("team-a"))
    with a.responses.connect() as conn:
        conn.response.create(model="gpt-4.1", input="hello there")
        events = _events_until_end(conn)
        assert events[0].type == "response.created"
        assert events[-1].type == "response.completed"
        rid = events[0].response.id
        # The same connection serves the next response, chained to the first.
        conn.response.create(model="gpt-4.1", input="more", previous_response_id=rid)
        second = _events_until_end(conn)
        assert second[-1].type == "response.completed"
    # What went upstream is the gateway's serialisation, the model a deployment.
    sent = [json.loads(f) for f in sim.state.ws_frames]
    assert [f["model"] for f in sent] == ["dep-41-swc", "dep-41-swc"]
    assert sim.state.requests[-1].headers["authorization"].startswith("Bearer sim-token-")
    assert tenants.key("team-a") not in json.dumps(sim.state.requests[-1].headers)
    # Made over the socket, retrievable over HTTP by its owner only.
    assert a.responses.retrieve(rid).id == rid
    with pytest.raises(openai.NotFoundError):
        _client(gw, tenants.key("team-b")).responses.retrieve(rid)


def test_azure_client_socket(gw: Server, sim: Sim, tenants: Tenants) -> None:
    az = openai.AzureOpenAI(
        azure_endpoint=gw.url,
        api_key=tenants.key("team-a"),
        api_version="2025-04-01-preview",
        max_retries=0,
    )
    with az.responses.connect() as conn:
        conn.response.create(model="gpt-4.1", input="hi")
        assert _events_until_end(conn)[-1].type == "response.completed"


def test_refused_frames_get_error_frames_and_the_socket_serves_on(
    gw: Server, sim: Sim, tenants: Tenants
) -> None:
    a = _client(gw, tenants.key("team-a"))
    theirs = _client(gw, tenants.key("team-b")).responses.create(model="gpt-4.1", input="b")
    with a.responses.connect() as conn:
        for bad, code in (
            ({"model": "o3", "input": "x"}, "model_not_allowed"),
            ({"model": "gpt-4.1", "input": "x", "previous_response_id": theirs.id}, "not_found"),
            ({"input": "x"}, "missing_required_parameter"),
            ({"model": "gpt-4.1", "input": 5}, "invalid_type"),
        ):
            conn.response.create(**bad)  # type: ignore[arg-type]
            events = _events_until_end(conn)
            assert events[-1].type == "error", bad
            assert events[-1].error.code == code, (bad, events[-1])
        assert sim.state.ws_frames == []  # nothing upstream
        conn.response.create(model="gpt-4.1", input="fine")
        assert _events_until_end(conn)[-1].type == "response.completed"


def test_mcp_rewrite_and_audit_before_the_frame_goes_up(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    cfg = base_config({"swc": identity}, tenants, audit={"path": str(tmp_path / "a.jsonl")})
    cfg["tenants"]["team-a"]["mcp"] = {"require_approval": "always"}
    mcp = {
        "type": "mcp",
        "server_label": "docs",
        "server_url": "https://mcp.example/sse",
        "require_approval": "never",
    }
    audited_before: list[bool] = []
    identity.state.on_request = lambda rec: audited_before.append(
        (tmp_path / "a.jsonl").exists() and "mcp.tool" in (tmp_path / "a.jsonl").read_text()
    )
    with gateway(cfg) as gw:
        a = _client(gw, tenants.key("team-a"))
        with a.responses.connect() as conn:
            conn.response.create(model="gpt-4.1", input="x", tools=[mcp])  # type: ignore[list-item]
            _events_until_end(conn)
    sent = json.loads(identity.state.ws_frames[-1])
    assert sent["tools"][0]["require_approval"] == "always"
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert {"mcp.policy", "mcp.tool"} <= {r["event"] for r in records}
    assert audited_before and audited_before[-1]  # written before the upstream socket opened


def test_tokens_counted_and_slot_per_connection(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config(
        {"swc": identity}, tenants, prices={"gpt-4.1": {"currency": "EUR", "input": 2, "output": 8}}
    )
    cfg["tenants"]["team-a"]["quotas"] = {"tokens_per_minute": 20, "max_concurrent_requests": 1}
    with gateway(cfg) as gw:
        key = tenants.key("team-a")
        a = _client(gw, key)
        with a.responses.connect() as conn:
            # A second connection over the tenant's concurrency: 429 at the handshake.
            status, raw = _handshake(gw, "/openai/v1/responses", {**HANDSHAKE, "api-key": key})
            assert status == 429, raw
            conn.response.create(model="gpt-4.1", input=" ".join(["word"] * 30))
            assert _events_until_end(conn)[-1].type == "response.completed"
            conn.response.create(model="gpt-4.1", input="again")
            refused = _events_until_end(conn)[-1]
            assert refused.type == "error" and refused.error.code == "rate_limit_exceeded"
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'gateway_cost_total{currency="EUR",model="gpt-4.1",tenant="team-a"}' in metrics
        # The client left: the slot is free again within a second.
        deadline = time.monotonic() + 1
        while True:
            status, _ = _handshake(gw, "/openai/v1/responses", {**HANDSHAKE, "api-key": key})
            if status == 101:
                break
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.05)


@pytest.fixture
def ws_url(gw: Server) -> Iterator[str]:
    yield gw.url.replace("http://", "ws://") + "/openai/v1/responses"


def test_hostile_frames(gw: Server, sim: Sim, tenants: Tenants, ws_url: str) -> None:
    key = tenants.key("team-a")
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=8,
    )
    frames = st.one_of(
        st.text(max_size=40),
        st.binary(max_size=40),
        st.fixed_dictionaries(
            {"type": st.just("response.create")},
            optional={
                k: values
                for k in (
                    "model",
                    "input",
                    "tools",
                    "previous_response_id",
                    "conversation",
                    "stream",
                )
            },
        ).map(json.dumps),
    )

    async def run(batch: list[Any]) -> None:
        binary = [f for f in batch if isinstance(f, bytes)]
        if binary:  # the protocol has no binary frames: the socket is closed (1003)
            async with websockets.connect(ws_url, additional_headers={"api-key": key}) as ws:
                await ws.send(binary[0])
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
        async with websockets.connect(ws_url, additional_headers={"api-key": key}) as ws:
            for frame in batch:
                if isinstance(frame, bytes):
                    continue
                await ws.send(frame)
                answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert answer["type"] in ("error", "response.created"), answer
                while answer["type"] not in ("error", "response.completed"):
                    answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if answer["type"] == "error":
                    assert set(answer["error"]) == {"type", "code", "message", "param"}
            # Still open and serving.
            await ws.send(json.dumps({"type": "response.create", "model": "gpt-4.1", "input": "x"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "response.completed":
                pass

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(frames, min_size=1, max_size=4))
    def attack(batch: list[Any]) -> None:
        asyncio.run(run(batch))

    attack()
    metrics = httpx.get(gw.url + "/metrics").text
    assert "gateway_inflight_requests 0.0" in metrics


def _socket_cfg(identity: Sim, tenants: Tenants, **server: Any) -> dict[str, Any]:
    cfg = base_config({"swc": identity}, tenants, server=server)
    cfg["tenants"]["team-a"]["quotas"] = {"max_concurrent_requests": 1}
    return cfg


async def _open(gw: Server, key: str) -> Any:
    url = gw.url.replace("http://", "ws://") + "/openai/v1/responses"
    return await websockets.connect(url, additional_headers={"api-key": key})


async def _one_response(ws: Any, text: str = "x") -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "response.create", "model": "gpt-4.1", "input": text}))
    events = []
    while True:
        events.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        if events[-1]["type"] in ("response.completed", "error"):
            return events


def _slot_free(gw: Server, key: str, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        status, _ = _handshake(gw, "/openai/v1/responses", {**HANDSHAKE, "api-key": key})
        if status == 101:
            return
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)


def test_client_leaving_closes_the_upstream_within_a_second(
    identity: Sim, tenants: Tenants
) -> None:
    key = tenants.key("team-a")
    with gateway(_socket_cfg(identity, tenants)) as gw:

        async def run() -> None:
            ws = await _open(gw, key)
            await _one_response(ws)
            assert identity.state.sockets_open == 1
            await ws.close()

        asyncio.run(run())
        deadline = time.monotonic() + 1
        while identity.state.sockets_open:
            assert time.monotonic() < deadline, "the upstream socket stayed open"
            time.sleep(0.02)
        _slot_free(gw, key, 1)


def test_upstream_leaving_closes_the_client_with_an_error(identity: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    with gateway(_socket_cfg(identity, tenants)) as gw:

        async def run() -> None:
            ws = await _open(gw, key)
            await ws.send(
                json.dumps({"type": "response.create", "model": "gpt-4.1", "input": "sim:close"})
            )
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert error["type"] == "error" and error["error"]["code"] == "upstream_socket_closed"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1011

        asyncio.run(run())
        _slot_free(gw, key, 1)


@pytest.mark.parametrize(
    ("server", "code", "reason"),
    [
        ({"websocket_idle_seconds": 0.6}, 1000, "idle timeout"),
        ({"websocket_max_seconds": 0.6, "websocket_idle_seconds": 30}, 1000, "time limit"),
    ],
)
def test_idle_and_time_limits(
    identity: Sim, tenants: Tenants, server: dict[str, float], code: int, reason: str
) -> None:
    key = tenants.key("team-a")
    with gateway(_socket_cfg(identity, tenants, **server)) as gw:

        async def run() -> None:
            ws = await _open(gw, key)
            await _one_response(ws)
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == code and reason in info.value.rcvd.reason
            assert time.monotonic() - started < 2

        asyncio.run(run())
        _slot_free(gw, key, 1)


def test_frame_over_the_body_limit_is_1009(identity: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    with gateway(_socket_cfg(identity, tenants, max_body_bytes=2000)) as gw:

        async def run() -> None:
            ws = await _open(gw, key)
            await ws.send(json.dumps({"type": "response.create", "input": "x" * 3000}))
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009

        asyncio.run(run())
        assert identity.state.ws_frames == []
        _slot_free(gw, key, 1)


def test_drain_closes_with_1001_after_the_response(identity: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    with gateway(_socket_cfg(identity, tenants)) as gw:
        gateway_obj = gw.server.config.app.state.gateway

        async def run() -> None:
            ws = await _open(gw, key)
            await ws.send(json.dumps({"type": "response.create", "model": "gpt-4.1", "input": "x"}))
            gateway_obj.draining = True  # mid-response: it ends first
            events = []
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
            assert events[-1]["type"] == "response.completed"
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001

        asyncio.run(run())
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'gateway_websocket_frames_total{api="responses",direction="in"}' in metrics
        assert 'gateway_websocket_connections{api="responses",tenant="team-a"} 0.0' in metrics


def test_first_frame_fails_over_to_the_next_resource(
    identity: Sim, sim2: Sim, tenants: Tenants
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = base_config({"swc": identity, "frc": sim2}, tenants)
    cfg["resources"]["swc"]["endpoint"] = f"http://127.0.0.1:{dead}"
    with gateway(cfg) as gw:
        a = _client(gw, tenants.key("team-a"))
        with a.responses.connect() as conn:
            conn.response.create(model="gpt-4.1", input="hi")
            assert _events_until_end(conn)[-1].type == "response.completed"
    assert [json.loads(f)["model"] for f in sim2.state.ws_frames] == ["dep-41-frc"]
