"""WebSocket handshakes where no socket is served: 426 with the usual JSON error (never a
405 or 404, after which clients such as Codex CLI retry for seconds before falling back
to HTTP), logged as a WebSocket attempt, and nothing upstream."""

from __future__ import annotations

import http.client
import json
import logging
import time

import pytest
from harness import Server, Sim, Tenants

HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
    "OpenAI-Beta": "responses_websockets=2026-02-06",
}


def _handshake(gw: Server, path: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/responses",
        "/openai/responses?api-version=2025-04-01-preview",
        "/openai/v1/realtime?model=gpt-4.1",
        "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4.1",
        "/openai/v1/files",
        "/healthz",
    ],
)
def test_upgrade_is_426_not_405(
    gw: Server, sim: Sim, tenants: Tenants, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    key = tenants.key("team-a")
    status, body = _handshake(gw, path, {**HANDSHAKE, "Authorization": f"Bearer {key}"})
    assert status == 426
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "websocket_not_served"
    assert set(error) == {"message", "type", "param", "code"}
    assert "HTTP" in error["message"]
    assert sim.state.api_requests() == []
    deadline = time.monotonic() + 3  # the access line is written after the answer is sent
    while not (lines := [r for r in caplog.records if r.name == "gateway.access"]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.01)
    assert lines and getattr(lines[-1], "transport", None) == "websocket"
    assert getattr(lines[-1], "tenant", None) == "team-a"
    assert getattr(lines[-1], "status", None) == 426
    assert key not in caplog.text


def test_a_plain_get_is_still_405(gw: Server, tenants: Tenants) -> None:
    status, body = _handshake(gw, "/openai/v1/responses", {"api-key": tenants.key("team-a")})
    assert status == 405
    assert body["error"]["code"] == "method_not_allowed"  # type: ignore[index]
