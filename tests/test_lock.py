"""The reproducible image: one lock (constraints.txt) for the Dockerfile and the tests.

The request path leans on aiohttp's connector and protocol (gateway/upstream.py), so a
minor release can break it: the suite must run on the versions the image ships, and
tests/test_upstream.py then holds the lean path on exactly those."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name.lower())] = ver
    return pins


def test_every_runtime_dependency_is_pinned_and_installed_at_its_pin() -> None:
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["tracing"]
    for dep in deps:
        name = re.split(r"[<>=!;\[ ]", dep, maxsplit=1)[0].lower().replace("_", "-")
        if "sys_platform" in dep and "win32" in dep and name not in pins:
            continue
        assert name in pins, f"{name} is not in constraints.txt: run scripts/lock.sh"
    for name in ("aiohttp", "multidict", "yarl", "uvicorn", "starlette", "python-multipart"):
        assert version(name) == pins[name], f"{name} {version(name)} != locked {pins[name]}"


def test_dockerfile_is_pinned_and_healthy() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"python:3\.11-slim@sha256:[0-9a-f]{64}", text)
    assert "-c constraints.txt" in text and "COPY pyproject.toml README.md constraints.txt" in text
    assert "compileall" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert "constraints.txt" not in (ROOT / ".dockerignore").read_text()
    assert "-c constraints.txt" in (ROOT / "scripts" / "test.sh").read_text()
