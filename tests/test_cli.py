"""The README's first command: `gateway demo` serves a working gateway with a fresh key."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai


def test_demo_end_to_end() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("IDENTITY_", "MSI_"))},
    )
    try:
        assert proc.stdout is not None
        key = None
        printed = ""
        deadline = time.monotonic() + 30
        while "Ctrl-C stops both" not in printed and time.monotonic() < deadline:
            line = proc.stdout.readline()
            printed += line
            match = re.search(r"Demo key .*: (gk-\S+)", line)
            key = key or (match.group(1) if match else None)
        assert key, "demo printed no key"
        base = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                httpx.get(base + "/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/openai/v1/", api_key=key)
        assert client.responses.create(model="gpt-4.1", input="Hello").output_text == "Echo: Hello"
        # The Python snippet the demo prints runs as printed: responses, files, chat, embeddings.
        snippet = printed.split("python3 -c '", 1)[1].split("'\n", 1)[0]
        ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.splitlines() == ["Echo: Hello", "Echo: Summarise", "Echo: Hi", "3"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
        assert proc.stdout is not None
        proc.stdout.close()


def test_check_command(tmp_path: object) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "config/example.yaml"],
        capture_output=True,
        text=True,
        env={**os.environ, "AOAI_FR_KEY": "x"},
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.returncode == 0 and "ok (2 tenants" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "config/example.yaml"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "AOAI_FR_KEY"},
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert bad.returncode == 2 and "resources.frc.api_key_env" in bad.stderr
