"""Memory of open WebSockets: N idle Responses-mode connections on one gateway worker.

Starts the simulator and the gateway (one worker, memory state), opens N client sockets
to ``/openai/v1/responses``, sends one ``response.create`` on each (so each also holds
its upstream socket to the simulator), lets them sit idle, and prints the gateway's RSS
before and after, per socket; then closes them and checks the gateway let go of them.

    python bench/sockets.py [--sockets 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import websockets
from common import rss_kib, servers

FRAME = json.dumps({"type": "response.create", "model": "gpt-4.1", "input": "hi"})


async def one(url: str, key: str, opened: asyncio.Event, release: asyncio.Event) -> None:
    async with websockets.connect(url, additional_headers={"api-key": key}) as ws:
        await ws.send(FRAME)
        while json.loads(await ws.recv())["type"] != "response.completed":
            pass
        opened.set()
        await release.wait()


async def run(url: str, key: str, pid: int, n: int) -> None:
    before = rss_kib(pid)
    release = asyncio.Event()
    flags = [asyncio.Event() for _ in range(n)]
    started = time.perf_counter()
    tasks = []
    for i in range(n):  # in waves of 50: a burst of 1,000 handshakes is not the point here
        tasks.append(asyncio.ensure_future(one(url, key, flags[i], release)))
        if i % 50 == 49:
            await asyncio.gather(*(f.wait() for f in flags[i - 49 : i + 1]))
    await asyncio.gather(*(f.wait() for f in flags))
    took = time.perf_counter() - started
    await asyncio.sleep(2)
    after = rss_kib(pid)
    print(f"{n} sockets open (each with one response done) in {took:.1f} s")
    print(f"gateway RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after")
    print(f"per open socket (client side + its upstream socket): {(after - before) / n:.1f} KiB")
    release.set()
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sockets", type=int, default=1000, help="how many to open")
    args = parser.parse_args()
    pids: list[int] = []
    with servers(pids=pids) as (_, gateway, key):
        url = gateway.replace("http://", "ws://") + "/openai/v1/responses"
        asyncio.run(run(url, key, pids[0], args.sockets))


if __name__ == "__main__":
    main()
