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
        # The guarded tenant: the simulator's Content Safety refuses a marked prompt.
        guarded = re.search(r"Guarded key .*: (gk-\S+)", printed)
        assert guarded is not None
        careful = openai.OpenAI(base_url=base + "/openai/v1/", api_key=guarded.group(1))
        assert careful.responses.create(model="gpt-4.1", input="Hello").output_text
        try:
            careful.responses.create(model="gpt-4.1", input="JAILBREAK-TEST")
        except openai.BadRequestError as exc:
            assert exc.code == "content_filter"
        else:
            raise AssertionError("the guarded tenant's jailbreak prompt went through")
        # The Python snippet the demo prints runs as printed, with the demo's own Python:
        # responses, files, chat, embeddings, Realtime, a batch job.
        assert f"{sys.executable} -m pip install" in printed
        snippet = printed.split(f"{sys.executable} -c '", 1)[1].split("'\n", 1)[0]
        ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.splitlines() == [
            "Echo: Hello",
            "Echo: Summarise",
            "Echo: Hi",
            "3",
            "HelloHelloHello",
            "validating",
        ]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
        assert proc.stdout is not None
        rest = proc.stdout.read()
        proc.stdout.close()
    # The access log at INFO: a JSON line per request.
    assert '"logger":"gateway.access"' in rest.replace(" ", "")


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


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_version_and_enum_options() -> None:
    out = _cli("--version")
    assert out.returncode == 0 and re.fullmatch(r"gateway \S+\n", out.stdout)
    bad = _cli("serve", "--config", "x.yaml", "--log-level", "loud")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert "{DEBUG,INFO,WARNING,ERROR}" in _cli("serve", "--help").stdout


def test_every_option_has_help() -> None:
    import argparse

    from gateway.cli import build_parser

    missing = []
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{parser.prog} {action.dest}")
    assert missing == []


def test_check_refuses_likely_mistakes(tmp_path: object) -> None:
    import pathlib

    import yaml

    cfg = {
        "resources": {
            "swc": {"endpoint": "https://swc.example.com", "region": "swedencentral"},
            "frc": {"endpoint": "https://frc.example.com", "region": "francecentral"},
        },
        "models": {
            "gpt-4.1": [{"resource": "swc", "deployment": "d"}],
            "o3": [{"resource": "frc", "deployment": "o"}],
        },
        "tenants": {
            "team-a": {"models": ["gpt-4.1", "o3", "gpt-41-typo"], "regions": ["francecentral"]},
        },
    }
    path = pathlib.Path(str(tmp_path)) / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = _cli("check", str(path))
    assert out.returncode == 2
    assert (
        "tenants.team-a.models[2]: 'gpt-41-typo' matches no model in models "
        "(did you mean 'gpt-4.1'?)"
    ) in out.stderr
    assert "tenants.team-a.models[0]: 'gpt-4.1' is deployed only in swedencentral" in out.stderr
    assert "'o3'" not in out.stderr  # reachable
    # A region typo names the closest regions.
    cfg["tenants"]["team-a"] = {"models": ["o3"], "regions": ["francecentral"]}
    cfg["resources"]["frc"]["region"] = "france-central"
    path.write_text(yaml.safe_dump(cfg))
    out = _cli("check", str(path))
    assert out.returncode == 2
    assert "'france-central' is not an Azure region (did you mean 'francecentral'" in out.stderr
    # --no-secrets: everything but the environment (CI checks a config without them).
    cfg["resources"]["frc"] = {
        "endpoint": "https://frc.example.com",
        "region": "francecentral",
        "auth": "api_key",
        "api_key_env": "NOT_SET_HERE",
    }
    path.write_text(yaml.safe_dump(cfg))
    out = _cli("check", str(path))
    assert out.returncode == 2 and "NOT_SET_HERE is not set" in out.stderr
    out = _cli("check", "--no-secrets", str(path))
    assert out.returncode == 0 and "ok" in out.stdout and "--no-secrets" in out.stdout


def test_simulate_says_how_to_reach_it_and_local_config_serves() -> None:
    """`gateway simulate` prints its address and credential; config/local.yaml works with it."""
    import pathlib

    import yaml
    from harness import gateway

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "simulate", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = ""
        deadline = time.monotonic() + 30
        while "Ctrl-C" not in printed and time.monotonic() < deadline:
            printed += proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in printed
        assert "SIM_API_KEY=sim-api-key" in printed and "IDENTITY_HEADER=" in printed
        local = pathlib.Path(__file__).parent.parent / "config" / "local.yaml"
        text = local.read_text()
        key = re.search(r"-H \"api-key: (gk-\S+)\"", text).group(1)  # type: ignore[union-attr]
        cfg = yaml.safe_load(text)
        cfg["resources"]["sim"]["endpoint"] = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/openai/v1/files", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        with gateway(cfg, {"SIM_API_KEY": "sim-api-key"}) as gw:
            client = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0)
            assert client.responses.create(model="gpt-4.1", input="Hello").output_text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
