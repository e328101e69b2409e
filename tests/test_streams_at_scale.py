"""1,000 concurrent slow streams through one gateway process with the default config."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from pathlib import Path

import aiohttp
from harness import GatewayProcess, Sim, Tenants, base_config

from gateway.simulator import IDENTITY_HEADER

STREAMS = 1000


async def _one(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, bytes]:
    async with session.post(
        url + "/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "one two three four", "stream": True},
        headers={"api-key": key, "x-sim-delay": "0.05"},
    ) as r:
        return r.status, await r.read()


async def _all(url: str, key: str) -> list[tuple[int, bytes] | BaseException]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(
            *(_one(session, url, key) for _ in range(STREAMS)), return_exceptions=True
        )


def test_1000_concurrent_slow_streams(sim: Sim, tenants: Tenants, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    cfg = base_config({"swc": sim}, tenants)
    del cfg["upstream"]  # the default pool and timeouts
    env = {"IDENTITY_ENDPOINT": f"{sim.url}/msi/token", "IDENTITY_HEADER": IDENTITY_HEADER}
    gw = GatewayProcess(cfg, str(tmp_path), env).start()
    try:
        started = time.monotonic()
        results = asyncio.run(_all(gw.url, tenants.key("team-a")))
        took = time.monotonic() - started
    finally:
        err = gw.stop()
    failures = [r for r in results if isinstance(r, BaseException) or r[0] != 200]
    assert not failures, failures[:3]
    complete = 0
    for result in results:
        assert not isinstance(result, BaseException)
        last = result[1].strip().rsplit(b"\n\n", 1)[-1]
        event = json.loads(last.split(b"data: ", 1)[1])
        complete += event["type"] == "response.completed"
    print(f"{complete}/{STREAMS} streams complete in {took:.1f} s")
    assert complete == STREAMS
    assert "Traceback" not in err
