"""Soak: minutes of mixed traffic through one gateway process; its RSS every minute.

Mixed traffic: JSON creates, streamed creates, retrieves of owned responses, client
errors (bad JSON, wrong types, unknown ids) and streams the client cuts off early.
The memory backend is capped (``state.memory_max_objects``) low enough that the cap is
reached during warm-up, so what grows afterwards is a leak, not retention.

Prints RSS each minute and the slope (MB/min) after the first minute.

    python bench/soak.py [--minutes 10] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import httpx
from common import rss_kib, servers

PATH = "/openai/v1/responses"


def rss_mb(pid: int) -> float:
    return rss_kib(pid) / 1024


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minute, MB) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


async def traffic(
    gw: str, key: str, until: float, concurrency: int, counts: dict[str, int]
) -> None:
    headers = {"api-key": key}
    owned: list[str] = []
    rng = random.Random(7)

    async def one(client: httpx.AsyncClient) -> None:
        kind = rng.choices(["json", "stream", "retrieve", "bad", "cut"], [40, 25, 15, 10, 10])[0]
        body = {"model": "gpt-4.1", "input": f"soak {rng.random()}"}
        if kind == "json":
            r = await client.post(PATH, json=body, headers=headers)
            if r.status_code == 200:
                owned.append(r.json()["id"])
                del owned[:-1000]
        elif kind == "stream":
            r = await client.post(PATH, json={**body, "stream": True}, headers=headers)
        elif kind == "retrieve" and owned:
            r = await client.get(f"{PATH}/{rng.choice(owned)}", headers=headers)
        elif kind == "bad":
            bad = rng.choice([b"{nope", b'{"model": "gpt-4.1", "tools": 5}', b"[1]"])
            r = await client.post(PATH, content=bad, headers=headers)
        else:
            async with client.stream(
                "POST",
                PATH,
                json={**body, "stream": True},
                headers={**headers, "x-sim-delay": "0.01"},
            ) as r:
                async for _ in r.aiter_raw():
                    break  # the client goes away mid-stream
        counts[kind] = counts.get(kind, 0) + 1

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=gw, timeout=30, trust_env=False) as client:
            while time.monotonic() < until:
                try:
                    await one(client)
                except httpx.HTTPError:
                    counts["transport_error"] = counts.get("transport_error", 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    pids: list[int] = []
    extra = {"state": {"backend": "memory", "memory_max_objects": 20_000}}
    with servers(extra, pids) as (_, gw, key):
        pid = pids[-1]
        start = time.monotonic()
        end = start + args.minutes * 60
        points: list[tuple[float, float]] = [(0.0, rss_mb(pid))]
        print(f"minute  0: RSS {points[0][1]:7.1f} MB", flush=True)
        counts: dict[str, int] = {}

        async def sample() -> None:
            minute = 1
            while time.monotonic() < end:
                await asyncio.sleep(max(0.0, start + minute * 60 - time.monotonic()))
                points.append((float(minute), rss_mb(pid)))
                done = sum(counts.values())
                print(
                    f"minute {minute:2d}: RSS {points[-1][1]:7.1f} MB, {done} requests", flush=True
                )
                minute += 1

        async def both() -> None:
            await asyncio.gather(traffic(gw, key, end, args.concurrency, counts), sample())

        asyncio.run(both())
        after = [p for p in points if p[0] >= 1]
        print(f"requests: {counts}")
        print(f"RSS slope after warm-up: {slope(after):+.3f} MB/min over {len(after)} samples")


if __name__ == "__main__":
    main()
