"""Regression tests for the failure paths: each named for the defect it pins down.

After every hostile request the tenant (``max_concurrent_requests: 1``) must still be
served and the in-flight gauge must be back to 0: nothing leaks a slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Server, Sim, SocketServer, Tenants, base_config, gateway, serving
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.audit_sinks import verify
from gateway.logs import JsonFormatter

URL = "/openai/v1/responses"


def _cfg(sim: Sim, tenants: Tenants, **over: Any) -> dict[str, Any]:
    cfg = base_config({"swc": sim}, tenants, **over)
    cfg["tenants"]["team-a"]["quotas"] = {"max_concurrent_requests": 1}
    return cfg


@pytest.fixture
def hgw(identity: Sim, tenants: Tenants) -> Iterator[Server]:
    with gateway(_cfg(identity, tenants)) as server:
        yield server


def _post(gw: Server, body: Any, key: str, **kw: Any) -> httpx.Response:
    headers = {"api-key": key, **kw.pop("headers", {})}
    if isinstance(body, bytes):
        return httpx.post(gw.url + URL, content=body, headers=headers, **kw)
    return httpx.post(gw.url + URL, json=body, headers=headers, **kw)


def _assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert r.headers["x-request-id"]


def assert_still_served(gw: Server, key: str) -> None:
    """The tenant's only slot is free and the in-flight gauge is back to 0."""
    deadline = time.monotonic() + 5
    while True:
        metrics = httpx.get(gw.url + "/metrics").text
        if "gateway_inflight_requests 0.0" in metrics or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert "gateway_inflight_requests 0.0" in metrics
    r = _post(gw, {"model": "gpt-4.1", "input": "still here?"}, key)
    assert r.status_code == 200, r.text


def test_tool_of_type_int_is_400_not_500(hgw: Server, tenants: Tenants, sim: Sim) -> None:
    key = tenants.key("team-a")
    cases = [
        ({"tools": 5}, "tools"),
        ({"tools": True}, "tools"),
        ({"tools": [{"type": 5}]}, "tools[0].type"),
        ({"tools": [{"type": "mcp", "server_label": "x"}, 7]}, "tools[1]"),
        ({"tools": [{"type": "mcp", "headers": {"a": 1}}]}, "tools[0].headers.a"),
        ({"tools": [{"type": "mcp", "allowed_tools": 5}]}, "tools[0].allowed_tools"),
        ({"tools": [{"type": "image_generation", "model": 5}]}, "tools[0].model"),
        ({"input": [{"type": ["message"]}]}, "input[0].type"),
        ({"input": [{"type": "mcp_list_tools", "tools": 5}]}, "input[0].tools"),
        ({"input": [{"type": "mcp_approval_response", "approve": "yes"}]}, "input[0].approve"),
        ({"input": 5}, "input"),
        ({"stream": "true"}, "stream"),
        ({"model": 4}, "model"),
        ({"previous_response_id": 5}, "previous_response_id"),
        ({"conversation": 5}, "conversation"),
        ({"include": "x"}, "include"),
    ]
    for extra, param in cases:
        r = _post(hgw, {"model": "gpt-4.1", "input": "x", **extra}, key)
        _assert_error(r, 400, "invalid_type", param)
        assert param in r.json()["error"]["message"]
    assert sim.state.api_requests() == []
    assert_still_served(hgw, key)


def test_strict_json(hgw: Server, tenants: Tenants, sim: Sim) -> None:
    key = tenants.key("team-a")
    for raw, mentions in [
        (b'{"model": "gpt-4.1", "input": NaN}', "line 1"),
        (b'{"model": "gpt-4.1", "temperature": Infinity}', "line 1"),
        (b'{"model": "gpt-4.1", "input": "\\ud800"}', "surrogate"),
        (b'{"model": "gpt-4.1", "input": "\xed\xa0\x80"}', "UTF-8"),
        (b'{"model": "gpt-4.1", "n": 12345678901234567890, "x": NaN}', "NaN"),
        (b'{"model": "gpt-4.1", "n": 12345678901234567890, "x": "\\udc00"}', "surrogate"),
    ]:
        r = _post(hgw, raw, key)
        _assert_error(r, 400, "invalid_json")
        assert mentions in r.json()["error"]["message"], r.text
    assert sim.state.api_requests() == []


def test_json_depth_is_400(hgw: Server, tenants: Tenants, sim: Sim) -> None:
    key = tenants.key("team-a")
    for depth in (129, 1000, 100_000):
        nested = b'{"model": "gpt-4.1", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
        r = _post(hgw, nested, key)
        _assert_error(r, 400, "invalid_json")
        assert "nested deeper than 128" in r.json()["error"]["message"]
    deep_tools = {"type": "mcp", "server_label": "d", "allowed_tools": {}}
    cursor = deep_tools["allowed_tools"]
    for _ in range(500):
        cursor["x"] = {}
        cursor = cursor["x"]
    _assert_error(_post(hgw, {"model": "gpt-4.1", "tools": [deep_tools]}, key), 400, "invalid_json")
    assert sim.state.api_requests() == []
    # Within the limit it is forwarded as is.
    ok = b'{"model": "gpt-4.1", "input": "x", "metadata": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}"
    assert _post(hgw, ok, key).status_code == 200
    assert_still_served(hgw, key)


def test_large_integers(hgw: Server, tenants: Tenants, sim: Sim) -> None:
    """Up to 64 bits forwarded exactly; beyond, a 400 (finding 11: 5,000 digits was a 500)."""
    key = tenants.key("team-a")
    raw = b'{"model": "gpt-4.1", "input": "x", "seed": 18446744073709551615}'
    assert _post(hgw, raw, key).status_code == 200
    assert b'"seed":18446744073709551615' in sim.state.api_requests()[-1].body
    before = len(sim.state.api_requests())
    for digits in (b"18446744073709551616", b"-9223372036854775809", b"1" + b"0" * 5000):
        raw = b'{"model": "gpt-4.1", "input": "x", "max_output_tokens": ' + digits + b"}"
        _assert_error(_post(hgw, raw, key), 400, "number_out_of_range")
    assert len(sim.state.api_requests()) == before


def test_non_ascii_header_is_400(hgw: Server, tenants: Tenants, sim: Sim) -> None:
    key = tenants.key("team-a")
    r = _post(hgw, {"model": "gpt-4.1", "input": "x"}, key, headers={"x-team": b"caf\xe9"})
    _assert_error(r, 400, "invalid_header", "x-team")
    assert sim.state.api_requests() == []
    assert_still_served(hgw, key)


def _raw_http(port: int, data: bytes, read: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


@pytest.mark.parametrize("operation", ["create", "cancel"])
def test_disconnect_during_body_frees_the_slot(
    hgw: Server, tenants: Tenants, sim: Sim, caplog: pytest.LogCaptureFixture, operation: str
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    key = tenants.key("team-a")
    path = URL if operation == "create" else f"{URL}/{_background(hgw, key)}/cancel"
    before = len(sim.state.api_requests())
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\napi-key: {key}\r\n"
        "content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    )
    _raw_http(hgw.port, head.encode() + b'{"model": "gpt-4.1", "in', read=False)
    assert_still_served(hgw, key)
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    cut = [line for line in lines if line.get("status") == 499]
    assert cut and cut[0]["error_code"] == "client_disconnected" and cut[0]["request_id"]
    assert cut[0]["operation"] == operation
    assert len(sim.state.api_requests()) == before + 1  # only the request after it


def _background(gw: Server, key: str) -> str:
    r = _post(gw, {"model": "gpt-4.1", "input": "x", "background": True}, key)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_60_mb_on_cancel_is_413(hgw: Server, tenants: Tenants, sim: Sim) -> None:
    key = tenants.key("team-a")
    rid = _background(hgw, key)
    before = len(sim.state.api_requests())
    url = f"{hgw.url}{URL}/{rid}/cancel"
    big = b"x" * (60 * 1024 * 1024)
    r = httpx.post(url, content=big, headers={"api-key": key}, timeout=30)
    _assert_error(r, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: the limit holds while streaming
        for _ in range(60):
            yield b"y" * (1024 * 1024)

    r = httpx.post(url, content=chunks(), headers={"api-key": key}, timeout=30)
    _assert_error(r, 413, "request_too_large")
    assert len(sim.state.api_requests()) == before
    assert_still_served(hgw, key)


def test_body_that_stops_arriving_is_408(identity: Sim, tenants: Tenants) -> None:
    cfg = _cfg(identity, tenants, server={"body_timeout_seconds": 0.5})
    key = tenants.key("team-a")
    with gateway(cfg) as gw:
        head = (
            f"POST {URL} HTTP/1.1\r\nhost: x\r\napi-key: {key}\r\n"
            "content-type: application/json\r\nconnection: close\r\ncontent-length: 100\r\n\r\n"
        )
        started = time.monotonic()
        out = _raw_http(gw.port, head.encode() + b'{"model"', timeout=5)
        assert time.monotonic() - started < 4
        assert out.startswith(b"HTTP/1.1 408"), out[:100]
        assert b'"request_timeout"' in out and b"x-request-id" in out
        assert_still_served(gw, key)


def test_header_block_that_stops_arriving_is_closed(identity: Sim, tenants: Tenants) -> None:
    cfg = _cfg(identity, tenants, server={"header_timeout_seconds": 0.5})
    with gateway(cfg) as gw:
        started = time.monotonic()
        out = _raw_http(gw.port, b"POST /openai/v1/responses HTTP/1.1\r\nhost: x\r\n", timeout=5)
        assert out == b"" and time.monotonic() - started < 4  # closed by the gateway
        started = time.monotonic()
        out = _raw_http(gw.port, b"", timeout=5)  # connects and says nothing
        assert out == b"" and time.monotonic() - started < 4
        # On a kept-alive connection: one whole request answered, then half a head.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            s.sendall(b"POST /openai/v1/responses HTTP/1.1\r\nhost: x\r\n")
            assert s.recv(65536) == b"" and time.monotonic() - started < 4
        # Pipelined: a whole request and half of the next in one write.
        started = time.monotonic()
        out = _raw_http(gw.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /heal", timeout=5)
        assert out.startswith(b"HTTP/1.1 200") and out.count(b"HTTP/1.1") == 1
        assert time.monotonic() - started < 4  # closed by the gateway, not by the client


def test_trailing_slash_is_404_without_location(hgw: Server, tenants: Tenants) -> None:
    r = httpx.post(
        hgw.url + URL + "/",
        json={"model": "gpt-4.1"},
        headers={"api-key": tenants.key("team-a"), "host": "evil.example"},
    )
    assert r.status_code == 404 and "location" not in r.headers


def test_upstream_sees_one_content_type_and_no_trailing_question_mark(
    hgw: Server, tenants: Tenants, sim: Sim
) -> None:
    raw_headers: list[list[tuple[bytes, bytes]]] = []
    sim.state.on_request = lambda rec: raw_headers.append([])
    key = tenants.key("team-a")
    r = _post(hgw, {"model": "gpt-4.1", "input": "x"}, key, headers={"content-type": "text/x"})
    _assert_error(r, 415, "unsupported_media_type")
    assert sim.state.api_requests() == []
    ctype = {"content-type": "Application/JSON; charset=UTF-8"}
    r = _post(hgw, {"model": "gpt-4.1", "input": "x"}, key, headers=ctype)
    assert r.status_code == 200
    rec = sim.state.api_requests()[-1]
    assert rec.headers["content-type"] == "application/json"
    assert rec.query == "" and rec.path == URL
    assert raw_headers


def _one_shot_upstream(handler: Any) -> Starlette:
    async def endpoint(request: Request) -> Response:
        result: Response = await handler(request)
        return result

    return Starlette(routes=[Route(URL, endpoint, methods=["POST"])])


def _api_key_cfg(url: str, tenants: Tenants, audit: Path | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "resources": {
            "up": {
                "endpoint": url,
                "region": "swedencentral",
                "auth": "api_key",
                "api_key_env": "K",
            }
        },
        "models": {"gpt-4.1": [{"resource": "up", "deployment": "d"}]},
        "tenants": {
            "team-a": {
                "keys": [tenants.entry("team-a")],
                "models": ["gpt-4.1"],
                "quotas": {"max_concurrent_requests": 1},
            }
        },
        "upstream": {"read_timeout": 5.0, "connect_timeout": 1.0, "forward_headers": ["x-sim-*"]},
    }
    if audit is not None:
        cfg["audit"] = {"path": str(audit)}
    return cfg


MCP_TOOL = {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example/sse"}


def test_surrogate_on_the_response_side(tenants: Tenants, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    body = (
        b'{"id": "resp_s1", "object": "response", "status": "completed", "output": ['
        b'{"type": "mcp_call", "id": "mcp_1", "server_label": "docs", "name": "q\\ud800",'
        b' "arguments": "{\\"q\\": \\"\\udc80\\"}", "output": "\\ud83d", "error": null}],'
        b' "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}'
    )

    async def handler(request: Request) -> Response:
        await request.body()
        if json.loads(await request.body()).get("stream"):
            events = [
                {"type": "response.created", "response": {"id": "resp_s2"}},
                {
                    "type": "response.output_item.done",
                    "item": json.loads(body)["output"][0],
                },
                {"type": "response.completed", "response": json.loads(body)},
            ]
            sse = b"".join(b"event: x\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)
            return Response(sse, media_type="text/event-stream")
        return Response(body, media_type="application/json")

    key = tenants.key("team-a")
    with (
        serving(_one_shot_upstream(handler)) as up,
        gateway(_api_key_cfg(up.url, tenants, audit), {"K": "k"}) as gw,
    ):
        r = _post(gw, {"model": "gpt-4.1", "input": "x", "tools": [MCP_TOOL]}, key)
        assert r.status_code == 200 and r.content == body
        r = _post(gw, {"model": "gpt-4.1", "input": "x", "tools": [MCP_TOOL], "stream": True}, key)
        assert r.status_code == 200 and b"response.completed" in r.content
        assert b'"type":"error"' not in r.content
        r = _post(gw, {"model": "gpt-4.1", "input": "again"}, key)
        assert r.status_code == 200
    lines = audit.read_text(encoding="utf-8").splitlines()
    calls = [json.loads(line) for line in lines if '"mcp.call"' in line]
    assert len(calls) == 3  # JSON, stream (its item once), and the request after
    assert all(c["name"] == "q\\ud800" for c in calls)
    assert verify([str(audit)]) == (len(lines), None)


def test_stream_with_no_terminal_event_gets_an_error_event(tenants: Tenants) -> None:
    async def handler(request: Request) -> Response:
        events = [
            {"type": "response.created", "response": {"id": "resp_t"}, "sequence_number": 0},
            {"type": "response.output_text.delta", "delta": "hal", "sequence_number": 1},
        ]
        sse = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
        return Response(sse, media_type="text/event-stream")

    key = tenants.key("team-a")
    with (
        serving(_one_shot_upstream(handler)) as up,
        gateway(_api_key_cfg(up.url, tenants), {"K": "k"}) as gw,
    ):
        r = _post(gw, {"model": "gpt-4.1", "input": "x", "stream": True}, key)
        assert r.status_code == 200
        last = r.content.strip().rsplit(b"\n\n", 1)[-1].strip()
        assert last.startswith(b"event: error\ndata: ")
        event = json.loads(last.split(b"data: ", 1)[1])
        assert event["code"] == "upstream_stream_incomplete"
        assert event["sequence_number"] == 2
        assert_still_served(gw, key)


class StaleKeepAliveUpstream(SocketServer):
    """Answers one request per connection with keep-alive, then closes on the next one.

    That is what an upstream whose idle timeout closed a pooled connection looks like
    to the client: the reused connection fails before any response byte.
    """

    def __init__(self) -> None:
        self.answered = 0
        self.dropped = 0
        super().__init__()

    def _read_request(self, conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += conn.recv(65536)
        return True

    def handle(self, conn: socket.socket) -> None:
        with conn:
            if not self._read_request(conn):
                return
            body = json.dumps(
                {"id": f"resp_k{self.answered}", "object": "response", "output": []}
            ).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            self.answered += 1
            if self._read_request(conn):
                self.dropped += 1  # close without answering


def test_stale_keepalive_connection_is_retried_once_on_a_fresh_one(tenants: Tenants) -> None:
    up = StaleKeepAliveUpstream()
    key = tenants.key("team-a")
    try:
        with gateway(_api_key_cfg(up.url, tenants), {"K": "k"}) as gw:
            for n in range(3):
                r = _post(gw, {"model": "gpt-4.1", "input": f"n{n}"}, key)
                assert r.status_code == 200, r.text
    finally:
        up.close()
    assert up.answered == 3
    assert up.dropped >= 1  # the reused connections failed, and nobody saw it


@pytest.mark.parametrize("stock", [False, True], ids=["gateway-protocol", "another-server"])
def test_client_gone_mid_download_closes_the_upstream(tenants: Tenants, stock: bool) -> None:
    """A binary answer (audio) relayed chunk by chunk: when the client goes away the
    relay stops and the upstream connection is closed, instead of reading it to the end."""
    sent: list[int] = []
    closed = threading.Event()

    async def audio(request: Request) -> StreamingResponse:
        n = 1 if (await request.json())["input"] == "short" else 100  # 100: 10 s of audio

        async def chunks() -> AsyncIterator[bytes]:
            try:
                for i in range(n):
                    sent.append(i)
                    yield b"\xff" * 1024
                    await asyncio.sleep(0.1)
            finally:
                closed.set()

        return StreamingResponse(chunks(), media_type="audio/mpeg")

    upstream = Starlette(routes=[Route("/openai/v1/audio/speech", audio, methods=["POST"])])
    with (
        serving(upstream) as up,
        gateway(_api_key_cfg(up.url, tenants), {"K": "k"}, stock=stock) as gw,
    ):
        with httpx.stream(
            "POST",
            gw.url + "/openai/v1/audio/speech",
            json={"model": "gpt-4.1", "input": "hello", "voice": "alloy"},
            headers={"api-key": tenants.key("team-a")},
            timeout=10,
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
            next(r.iter_raw())
        assert closed.wait(3), "the upstream was read on after the client left"
        assert len(sent) < 50
        # The tenant's only concurrency slot came back.
        again = httpx.post(
            gw.url + "/openai/v1/audio/speech",
            json={"model": "gpt-4.1", "input": "short", "voice": "alloy"},
            headers={"api-key": tenants.key("team-a")},
            timeout=10,
        )
        assert again.status_code == 200 and again.content == b"\xff" * 1024
