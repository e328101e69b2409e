"""1,000 concurrent slow streams through one gateway worker: TTFB, chunk delay, memory.

An upstream written for this (raw asyncio, its own process) streams Responses-style
SSE events, each stamped with the monotonic clock when it was written. The client
opens N streams at once, directly and then through the gateway, and prints:

- added time to first byte (p50, gateway minus direct);
- chunk delay p50/p99: receive time minus the upstream's stamp, for every event;
- the gateway's RSS per open stream (RSS with all streams open minus idle RSS, / N);
- how many streams completed with ``response.completed``.

    python bench/streams.py [--streams 1000] [--events 20] [--interval 0.25] [--repeat 3]

Rounds alternate direct and gateway waves; each round's figures are printed, then the
medians (this is a shared 2-core VM: one round can land in a noisy minute).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import re
import statistics
import time
from typing import NamedTuple, TypeVar

import aiohttp
from common import cpu_seconds, free_port, read_post, run_loop, servers
from soak import rss_mb

PATH = "/openai/v1/responses"
T = TypeVar("T")


def _event(kind: str, seq: int, **extra: object) -> bytes:
    data = {"type": kind, "sequence_number": seq, "t": time.monotonic(), **extra}
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def upstream_main(port: int, events: int, interval: float) -> None:
    """Serve SSE streams on ``port``: ``events`` deltas ``interval`` apart, then completed."""
    gc.disable()  # see main()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if not await read_post(reader, writer):
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )

                def chunk(data: bytes) -> None:
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))

                rid = f"resp_{id(writer):x}{time.monotonic_ns():x}"
                chunk(_event("response.created", 0, response={"id": rid}))
                await writer.drain()
                for n in range(1, events + 1):
                    await asyncio.sleep(interval)
                    chunk(_event("response.output_text.delta", n, delta=" word"))
                    await writer.drain()
                usage = {"input_tokens": 5, "output_tokens": events, "total_tokens": 5 + events}
                done = {"id": rid, "usage": usage}
                chunk(_event("response.completed", events + 1, response=done))
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    run_loop(serve())  # uvloop, like the client: the load generator must not be the bottleneck


class Stats:
    def __init__(self, n: int) -> None:
        self.n = n
        self.ttfb: list[float] = []
        self.delays: list[float] = []
        self.completed = 0
        self.failed = 0
        self.all_open = asyncio.Event()

    def opened(self) -> None:
        if len(self.ttfb) + self.failed >= self.n:
            self.all_open.set()


_STAMP = re.compile(rb'"t": ([0-9.]+)')


async def one(
    session: aiohttp.ClientSession, url: str, key: str, stats: Stats, delay: float
) -> None:
    body = {"model": "gpt-4.1", "input": "stream", "stream": True}
    await asyncio.sleep(delay)
    started = time.monotonic()
    try:
        async with session.post(url + PATH, json=body, headers={"api-key": key}) as r:
            first = True
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.monotonic()
                if first:
                    stats.ttfb.append(now - started)
                    stats.opened()
                    first = False
                buf += chunk
                stamps = _STAMP.findall(buf)
                stats.delays.extend(now - float(t) for t in stamps)
                if b"response.completed" in buf:
                    stats.completed += 1
                buf = buf[buf.rfind(b"\n\n") + 2 :] if stamps else buf
    except (TimeoutError, aiohttp.ClientError):
        stats.failed += 1


async def wave(url: str, key: str, n: int, pid: int | None, ramp: float) -> tuple[Stats, float]:
    """Open ``n`` streams over ``ramp`` seconds; their stats, and the RSS (MB) once all are open."""
    stats = Stats(n)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300)
    ) as session:
        tasks = [
            asyncio.ensure_future(one(session, url, key, stats, i * ramp / n)) for i in range(n)
        ]
        await stats.all_open.wait()
        rss = rss_mb(pid) if pid is not None else 0.0
        await asyncio.gather(*tasks)
    return stats, rss


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


class Round(NamedTuple):
    direct: Stats
    gateway: Stats
    rss_kib: float  # per open stream (meaningful in the first round, which grows the process)
    cpu_us: float  # gateway CPU per stream

    def figures(self) -> tuple[float, float, float]:
        """Added TTFB p50, gateway chunk delay p99 (ms), gateway chunk delay p50 (ms)."""
        added = pct(self.gateway.ttfb, 50) - pct(self.direct.ttfb, 50)
        return added, pct(self.gateway.delays, 99), pct(self.gateway.delays, 50)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--ramp", type=float, default=2.0, help="seconds over which streams open")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (direct, then gateway); medians")
    args = ap.parse_args()
    # The client's (and the upstream's) own collector pauses would be counted as delays
    # (a full collection of the client's ~150,000 objects stalls all 1,000 streams for
    # 40-75 ms): the load generator must not be what is measured.
    gc.disable()
    if args.ramp >= args.events * args.interval:
        raise SystemExit("--ramp must be shorter than a stream, so that all are open at once")
    port = free_port()
    up = multiprocessing.Process(
        target=upstream_main, args=(port, args.events, args.interval), daemon=True
    )
    up.start()
    pids: list[int] = []
    n = args.streams
    rounds: list[Round] = []
    try:
        with servers(pids=pids, upstream=f"http://127.0.0.1:{port}") as (direct, gw, key):
            pid = pids[-1]
            run_loop(wave(gw, key, 20, None, 0.0))  # warm up
            for _ in range(args.repeat):
                direct_stats, _ = run_loop(wave(direct, "-", n, None, args.ramp))
                idle = rss_mb(pid)
                cpu0 = cpu_seconds(pid)
                via, busy = run_loop(wave(gw, key, n, pid, args.ramp))
                cpu = cpu_seconds(pid) - cpu0
                rounds.append(Round(direct_stats, via, (busy - idle) * 1024 / n, cpu / n * 1e6))
    finally:
        up.terminate()
    print(
        f"{n} concurrent streams (opened over {args.ramp:g} s), {args.events} events "
        f"{args.interval:g} s apart, one worker, {args.repeat} rounds"
    )
    for i, r in enumerate(rounds, 1):
        for name, s in (("direct", r.direct), ("gateway", r.gateway)):
            print(
                f"#{i} {name:<8} TTFB p50 {pct(s.ttfb, 50):7.2f} ms p99 {pct(s.ttfb, 99):7.2f} ms"
                f" | chunk delay p50 {pct(s.delays, 50):6.2f} ms p99 {pct(s.delays, 99):6.2f} ms"
                f" | completed {s.completed}/{n}, failed {s.failed}"
            )
        added, p99, _ = r.figures()
        print(
            f"#{i} added TTFB p50 {added:+.2f} ms, gateway chunk delay p99 {p99:.2f} ms, "
            f"{r.cpu_us:.0f} us CPU per stream"
        )
    med = [statistics.median(values) for values in zip(*(r.figures() for r in rounds), strict=True)]
    completed = min(min(r.direct.completed, r.gateway.completed) for r in rounds)
    print(
        f"median of {len(rounds)}: added TTFB p50 {med[0]:+.2f} ms | gateway chunk delay "
        f"p50 {med[2]:.2f} ms p99 {med[1]:.2f} ms | "
        f"RSS per open stream {rounds[0].rss_kib:.1f} KiB (first round: later ones reuse it) | "
        f"gateway CPU per stream (open, {args.events + 2} events, close) "
        f"{statistics.median(r.cpu_us for r in rounds):.0f} us | "
        f"fewest completed {completed}/{n}"
    )


if __name__ == "__main__":
    main()
