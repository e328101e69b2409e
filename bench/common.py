"""Helpers shared by the benchmarks: processes on loopback, a gateway config, timing."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from gateway.keys import hash_key, new_key

T = TypeVar("T")

BODY = {"model": "gpt-4.1", "input": "benchmark the gateway overhead please"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """A process's resident memory (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_ready(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def process(
    args: list[str],
    env: dict[str, str] | None = None,
    pids: list[int] | None = None,
    output: Path | None = None,
) -> Iterator[None]:
    """``gateway`` with ``args``; its stdout and stderr to ``output`` (a file) or nowhere."""
    sink = open(output, "ab") if output is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=sink,
        stderr=sink,
    )
    if pids is not None:
        pids.append(proc.pid)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        if output is not None:
            sink.close()  # type: ignore[union-attr]


@contextmanager
def servers(
    extra_config: dict[str, object] | None = None,
    pids: list[int] | None = None,
    upstream: str | None = None,
    production: bool = False,
    code: str | None = None,
) -> Iterator[tuple[str, str, str]]:
    """(upstream URL, gateway URL, gateway key); ``pids`` gets the gateway's process id.

    The upstream is the simulator, started here, unless ``upstream`` names one.
    ``production``: as production runs it, access log at INFO (a line per request,
    written to a file) and the audit trail on (a file sink); else logs at WARNING.
    ``code``: a directory holding another version's ``gateway`` package (a checkout of an
    earlier commit), run instead of the installed one: an A/B in one run.
    """
    sim_port, gw_port = free_port(), free_port()
    sim_url = upstream or f"http://127.0.0.1:{sim_port}"
    key = new_key()
    cfg = {
        "resources": {
            "sim": {
                "endpoint": sim_url,
                "region": "swedencentral",
                "auth": "api_key",
                "api_key_env": "BENCH_SIM_KEY",
            }
        },
        "models": {"gpt-4.1": [{"resource": "sim", "deployment": "gpt-4.1"}]},
        "tenants": {"bench": {"keys": [{"id": "bench", "sha256": hash_key(key)}], "models": ["*"]}},
        # The simulator's pacing headers (x-sim-delay) reach it through the gateway.
        "upstream": {"forward_headers": ["x-sim-*"]},
    }
    extra = dict(extra_config or {})
    if "quotas" in extra:
        cfg["tenants"]["bench"]["quotas"] = extra.pop("quotas")  # type: ignore[index]
    cfg.update(extra)
    with tempfile.TemporaryDirectory() as tmp:
        if production:
            cfg["audit"] = {"path": str(Path(tmp) / "audit.jsonl")}
        if "state" not in cfg:  # the default backend (sqlite), its file in this run's directory
            cfg["state"] = {"backend": "sqlite", "path": str(Path(tmp) / "gateway-state.db")}
        path = Path(tmp) / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        simulate = ["simulate", "--port", str(sim_port)]
        with (
            process(simulate) if upstream is None else nullcontext(),
            process(
                [
                    "serve",
                    "--config",
                    str(path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(gw_port),
                    "--log-level",
                    "INFO" if production else "WARNING",
                ],
                {"BENCH_SIM_KEY": "sim-api-key", **({"PYTHONPATH": code} if code else {})},
                pids,
                Path(tmp) / "gateway.log" if production else None,
            ),
        ):
            sim, gw = sim_url, f"http://127.0.0.1:{gw_port}"
            wait_ready(sim + "/openai/v1/responses/x")
            wait_ready(gw + "/healthz")
            yield sim, gw, key


async def run(
    n: int, concurrency: int, one: Callable[[httpx.AsyncClient], Awaitable[float]]
) -> list[float]:
    """``n`` timings of ``one``, ``concurrency`` at a time, after a short warm-up."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:
        for _ in range(min(50, n)):
            await one(client)
        out: list[float] = []
        queue = iter(range(n))

        async def worker() -> None:
            for _ in queue:
                out.append(await one(client))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out


def timed_json(
    url: str, headers: dict[str, str]
) -> Callable[[httpx.AsyncClient], Awaitable[float]]:
    async def one(client: httpx.AsyncClient) -> float:
        t = time.perf_counter()
        r = await client.post(url, json=BODY, headers=headers)
        r.raise_for_status()
        return time.perf_counter() - t

    return one


def timed_ttfb(
    url: str, headers: dict[str, str]
) -> Callable[[httpx.AsyncClient], Awaitable[float]]:
    async def one(client: httpx.AsyncClient) -> float:
        t = time.perf_counter()
        async with client.stream("POST", url, json={**BODY, "stream": True}, headers=headers) as r:
            first = None
            async for _ in r.aiter_raw():
                first = first or time.perf_counter() - t
        return first or 0.0

    return one


async def read_post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A bench upstream reads one request (head and body); a GET (a readiness check) is
    answered 404 here and False returned."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    if head.startswith(b"GET"):
        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        return False
    return True


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when installed: a load generator must not be the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000
