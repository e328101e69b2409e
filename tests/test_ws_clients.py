"""Real clients that speak the Responses WebSocket mode, pointed at the gateway with only
their base URL changed: the OpenAI Agents SDK's websocket session and Codex CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from harness import Server, Sim, Tenants

CODEX_DIR = Path(__file__).parent.parent / ".cache" / "codex"
CODEX_VERSION = "0.171.0"


def test_agents_sdk_over_the_socket(gw: Server, sim: Sim, tenants: Tenants) -> None:
    from agents import Agent, responses_websocket_session, set_tracing_disabled

    set_tracing_disabled(True)

    async def run() -> tuple[str, str]:
        async with responses_websocket_session(
            api_key=tenants.key("team-a"), base_url=gw.url + "/openai/v1/"
        ) as session:
            agent = Agent(name="a", instructions="be brief", model="gpt-4.1")
            first = await session.run(agent, "hello there")
            second = await session.run(agent, "more", previous_response_id=first.last_response_id)
            return str(first.final_output), str(second.final_output)

    first, second = asyncio.run(run())
    assert first == "Echo: hello there" and second == "Echo: more"
    sockets = [r for r in sim.state.requests if r.method == "WEBSOCKET"]
    assert len(sockets) == 1  # both runs on one warm connection
    assert not [r for r in sim.state.api_requests() if r.method == "POST"]  # no HTTP fallback


def _codex() -> Path:
    """Codex CLI from the npm registry, installed once into .cache/ (skipped where npm
    is missing or the registry cannot be reached, as the issue allows)."""
    binary = CODEX_DIR / "node_modules" / ".bin" / "codex"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed here")
    CODEX_DIR.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", f"@openai/codex@{CODEX_VERSION}"],
        cwd=CODEX_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not binary.exists():
        pytest.skip(f"npm could not install Codex CLI: {done.stderr[-300:]}")
    return binary


def test_codex_cli_finishes_over_the_socket_without_falling_back(
    gw: Server, sim: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    codex = _codex()
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(
        f'model = "gpt-4.1"\nopenai_base_url = "{gw.url}/openai/v1"\n'
    )
    env = {**os.environ, "CODEX_HOME": str(home)}
    login = subprocess.run(
        [str(codex), "login", "--with-api-key"],
        input=tenants.key("team-a"),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert login.returncode == 0, login.stderr
    started = time.monotonic()
    done = subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "say hello"],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Echo: say hello" in done.stdout
    assert took < 5, took  # no 6 s of handshakes and retries before a fallback
    sockets = [r for r in sim.state.requests if r.method == "WEBSOCKET"]
    assert sockets and sockets[0].headers.get("openai-beta", "").startswith("responses_websockets")
    assert not [r for r in sim.state.api_requests() if r.method == "POST"]  # no HTTP fallback
