"""A socket lives under the credential that opened it: a key revoked through the admin
API, expired, past its rotation grace, or whose tenant a reload removed closes both
socket kinds within a second (an error event invalid_api_key, close 1008), and the
connection's slot is free again."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import yaml
from harness import Server, Sim, Tenants, base_config, serving

from gateway.app import create_app
from gateway.config import load_config
from gateway.keys import hash_key, new_key

PATHS = {
    "responses": "/openai/v1/responses",
    "realtime": "/openai/v1/realtime?model=gpt-4o-mini",
}


def _config(sim: Sim, tenants: Tenants, admin: str) -> dict[str, Any]:
    cfg = base_config({"swc": sim}, tenants, server={"reload_interval_seconds": 0.1})
    cfg["admin"] = {"key_sha256": hash_key(admin)}
    # One socket at a time: a freed slot is seen as the next socket's handshake.
    cfg["tenants"]["team-a"]["quotas"] = {"max_concurrent_requests": 1}
    return cfg


@pytest.fixture
def setup(identity: Sim, tenants: Tenants, tmp_path: Path) -> Iterator[tuple[Server, str, Path]]:
    admin = new_key()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config(identity, tenants, admin)))
    app = create_app(load_config(path), config_path=str(path))
    with serving(app) as gw:
        yield gw, admin, path


def _new_key(gw: Server, admin: str, **extra: Any) -> dict[str, Any]:
    r = httpx.post(
        gw.url + "/admin/keys",
        json={"tenant": "team-a", "name": "socket", **extra},
        headers={"api-key": admin},
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _opened(gw: Server, kind: str, key: str) -> Any:
    url = gw.url.replace("http://", "ws://") + PATHS[kind]
    ws = await websockets.connect(url, additional_headers={"api-key": key})
    if kind == "realtime":
        assert json.loads(await ws.recv())["type"] == "session.created"
    return ws


async def _closed_within(ws: Any, seconds: float) -> tuple[dict[str, Any], int]:
    """The error event before the close, and the close code."""
    error: dict[str, Any] = {}
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), seconds))
            if event["type"] == "error":
                error = event["error"]
    assert info.value.rcvd is not None
    return error, info.value.rcvd.code


def _ended(
    gw: Server,
    kind: str,
    key: str,
    kill: Callable[[], None],
    send_after: bool = False,
    within: float = 1.0,
) -> None:
    async def run() -> None:
        ws = await _opened(gw, kind, key)
        try:
            kill()
            began = time.monotonic()
            if send_after:  # the next frame is refused as well
                await ws.send(json.dumps({"type": "response.create", "model": "gpt-4.1"}))
            error, code = await _closed_within(ws, within + 1)
            took = time.monotonic() - began
        finally:
            await ws.close()
        assert error.get("code") == "invalid_api_key", error
        assert code == 1008 and took < within + 0.25, (code, took)

    asyncio.run(run())


def _slot_free(gw: Server, kind: str, key: str) -> None:
    async def run() -> None:
        deadline = time.monotonic() + 2
        while True:
            try:
                ws = await _opened(gw, kind, key)
            except websockets.InvalidStatus as exc:
                assert exc.response.status_code == 429
                assert time.monotonic() < deadline, "the slot was not freed"
                await asyncio.sleep(0.05)
                continue
            await ws.close()
            return

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["responses", "realtime"])
def test_a_revoked_key_closes_its_open_sockets(
    setup: tuple[Server, str, Path], sim: Sim, kind: str
) -> None:
    gw, admin, _ = setup
    key = _new_key(gw, admin)

    def revoke() -> None:
        r = httpx.delete(gw.url + f"/admin/keys/{key['id']}", headers={"api-key": admin})
        assert r.status_code == 200

    _ended(gw, kind, key["key"], revoke, send_after=True)
    _slot_free(gw, kind, _new_key(gw, admin)["key"])
    frames = [json.loads(f) for f in sim.state.ws_frames]
    assert [f for f in frames if f.get("type") == "response.create"] == []


@pytest.mark.parametrize("kind", ["responses", "realtime"])
def test_an_expired_key_closes_its_open_sockets(setup: tuple[Server, str, Path], kind: str) -> None:
    gw, admin, _ = setup
    when = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0) + timedelta(seconds=1)
    key = _new_key(gw, admin, expires_at=when.strftime("%Y-%m-%dT%H:%M:%SZ"))
    wait = (when - datetime.now(UTC)).total_seconds()
    _ended(gw, kind, key["key"], lambda: time.sleep(max(wait, 0)))
    _slot_free(gw, kind, _new_key(gw, admin)["key"])


@pytest.mark.parametrize("kind", ["responses", "realtime"])
def test_a_rotated_secret_past_its_grace_closes_its_sockets(
    setup: tuple[Server, str, Path], kind: str
) -> None:
    gw, admin, _ = setup
    key = _new_key(gw, admin)
    rotated: list[str] = []

    def rotate() -> None:
        r = httpx.post(
            gw.url + f"/admin/keys/{key['id']}/rotate",
            json={"grace_seconds": 1},
            headers={"api-key": admin},
        )
        assert r.status_code == 201
        rotated.append(r.json()["key"])

    began = time.monotonic()
    _ended(gw, kind, key["key"], rotate, within=2.0)
    assert time.monotonic() - began >= 1.0  # the grace held
    _slot_free(gw, kind, rotated[0])


@pytest.mark.parametrize("kind", ["responses", "realtime"])
def test_a_tenant_removed_by_a_reload_closes_its_sockets(
    setup: tuple[Server, str, Path], identity: Sim, tenants: Tenants, kind: str
) -> None:
    gw, _, path = setup
    cfg = yaml.safe_load(path.read_text())

    def remove() -> None:
        del cfg["tenants"]["team-a"]
        path.write_text(yaml.safe_dump(cfg))

    # The reload's polling (0.1 s) and the watchdog together stay within the second.
    _ended(gw, kind, tenants.key("team-a"), remove, within=1.0)
    r = httpx.post(
        gw.url + "/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "x"},
        headers={"api-key": tenants.key("team-a")},
    )
    assert r.status_code == 401
