"""Streams at token rate: CPU per relayed event, gateway against nginx, in one run.

An LLM stream is one small SSE event per token, 30-100 events/s. An upstream written
for this (raw asyncio on uvloop, its own process, one timer for all streams) sends each
stream ``response.created``, then ``response.output_text.delta`` events (~170 bytes,
shaped like Azure's) at ``--rate`` per second for ``--seconds``, then
``response.completed``; each event is stamped with the monotonic clock when written.
A client (raw asyncio protocol, its own process) opens ``--streams`` streams over
``--ramp`` seconds, through each target in turn: the gateway (one worker) and, when
installed, nginx (one worker, ``proxy_pass``, ``proxy_buffering off``). Per target:

- CPU per relayed event: the target's CPU time (utime + stime, all its processes)
  during the wave, divided by the events it relayed (request setup included);
- chunk delay p50/p99: receive time minus the upstream's stamp, for every event;
- first-event p99: request sent to ``response.created`` received;
- streams completed (``response.completed`` seen) out of those opened.

    python bench/tokens.py [--streams 200 500] [--rate 50] [--seconds 10] [--repeat 2]
                           [--before DIR]

``--before DIR`` adds a second gateway run from the ``gateway`` package in DIR (e.g.
``git worktree add /tmp/before <commit>``): before and after in the same run.

CPU per event is the figure that matters: latency on a shared 2-core VM is noisy (the
upstream and the client share the cores with the target), CPU time is not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from common import free_port, read_post, run_loop, servers
from overhead import nginx

PATH = "/openai/v1/responses"


def _event(kind: str, seq: int, **extra: object) -> bytes:
    data = {"type": kind, "sequence_number": seq, **extra, "t": round(time.monotonic(), 6)}
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def upstream_main(port: int, rate: float, seconds: float) -> None:
    """Serve SSE streams on ``port``; one timer ticks every stream at ``rate`` per second."""
    gc.disable()
    live: dict[asyncio.StreamWriter, list[object]] = {}
    total = int(rate * seconds)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if not await read_post(reader, writer):
                    continue
                rid = f"resp_{time.monotonic_ns():x}{id(writer):x}"
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                    + _chunk(_event("response.created", 0, response={"id": rid}))
                )
                done = asyncio.get_running_loop().create_future()
                live[writer] = [rid, 0, f"msg_{rid[5:]}", done]
                await done
        except (asyncio.IncompleteReadError, ConnectionError):
            live.pop(writer, None)
            writer.close()

    async def tick() -> None:
        interval = 1 / rate
        nxt = time.monotonic()
        while True:
            nxt += interval
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            for writer, st in list(live.items()):
                rid, n, item, done = st
                n = st[1] = n + 1  # type: ignore[operator]
                if n <= total:
                    writer.write(
                        _chunk(
                            _event(
                                "response.output_text.delta",
                                n,
                                item_id=item,
                                output_index=0,
                                content_index=0,
                                delta=" word",
                                logprobs=[],
                            )
                        )
                    )
                    continue
                usage = {"input_tokens": 5, "output_tokens": total, "total_tokens": 5 + total}
                final = {"id": rid, "status": "completed", "usage": usage}
                writer.write(_chunk(_event("response.completed", n, response=final)) + b"0\r\n\r\n")
                del live[writer]
                done.set_result(None)  # type: ignore[attr-defined]

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        ticker = asyncio.ensure_future(tick())
        async with server:
            await server.serve_forever()
        ticker.cancel()

    run_loop(serve())


_STAMP = re.compile(rb'"t":([0-9.]+)')


class _Stream(asyncio.Protocol):
    """One streamed request over a raw connection; notes stamps as the bytes arrive."""

    def __init__(self, request: bytes, out: dict[str, list[float]], done: asyncio.Future[bool]):
        self.request, self.out, self.done = request, out, done
        self.sent = 0.0
        self.first = True
        self.tail = b""
        self.completed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sent = time.monotonic()
        transport.write(self.request)  # type: ignore[attr-defined]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.tail + data
        stamps = _STAMP.findall(buf)
        if stamps:
            if self.first:
                self.first = False
                self.out["first"].append(now - self.sent)
            self.out["delay"].extend(now - float(t) for t in stamps)
            self.tail = buf[buf.rfind(b'"t":') + 4 :][-24:]
        else:
            self.tail = buf[-24:]
        if b"response.completed" in buf:
            self.completed = True
        if buf.endswith(b"0\r\n\r\n") and self.completed:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.completed)


async def _wave(port: int, key: str, n: int, ramp: float) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    body = json.dumps({"model": "gpt-4.1", "input": "stream", "stream": True}).encode()
    request = (
        f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"api-key: {key}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body
    out: dict[str, list[float]] = {"first": [], "delay": [], "completed": [], "failed": []}

    async def one(delay: float) -> None:
        await asyncio.sleep(delay)
        done: asyncio.Future[bool] = loop.create_future()
        try:
            await loop.create_connection(lambda: _Stream(request, out, done), "127.0.0.1", port)
            out["completed" if await done else "failed"].append(1)
        except OSError:
            out["failed"].append(1)

    await asyncio.gather(*(one(i * ramp / n) for i in range(n)))
    return out


def client_main(port: int, key: str, n: int, ramp: float, path: str) -> None:
    gc.disable()  # the load generator's pauses must not be measured as delays
    out = run_loop(_wave(port, key, n, ramp))
    Path(path).write_text(json.dumps(out))


def _user_system(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _tree_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its children (nginx's worker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    times = [_user_system(p) for p in (pid, *map(int, children))]
    return sum(t[0] for t in times), sum(t[1] for t in times)


class Wave(NamedTuple):
    target: str
    streams: int
    cpu_us_per_event: float
    system_us_per_event: float  # of which in the kernel
    delay_p50_ms: float
    delay_p99_ms: float
    first_p99_ms: float
    completed: int
    events: int


def _pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def wave(target: str, url: str, key: str, pid: int, n: int, ramp: float) -> Wave:
    port = int(url.rsplit(":", 1)[1])
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        client = multiprocessing.Process(target=client_main, args=(port, key, n, ramp, f.name))
        user0, sys0 = _tree_cpu(pid)
        client.start()
        client.join()
        user1, sys1 = _tree_cpu(pid)
        user, system = user1 - user0, sys1 - sys0
        out = json.loads(Path(f.name).read_text() or "{}")
    events = len(out["delay"])
    return Wave(
        target,
        n,
        (user + system) / max(events, 1) * 1e6,
        system / max(events, 1) * 1e6,
        _pct(out["delay"], 50),
        _pct(out["delay"], 99),
        _pct(out["first"], 99),
        len(out["completed"]),
        events,
    )


@contextmanager
def _targets(upstream: str, before: str | None) -> Iterator[list[tuple[str, str, str, int]]]:
    pids: list[int] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        servers(pids=pids, upstream=upstream) as (_, gw, key),
        servers(pids=pids, upstream=upstream, code=before)
        if before
        else contextlib.nullcontext(("", "", "")) as (_, old, old_key),
        nginx(upstream, Path(tmp)) as ngx,
    ):
        targets = [("gateway", gw, key, pids[0])]
        if before:
            targets.append(("before", old, old_key, pids[1]))
        if ngx is not None:
            master = int((Path(tmp) / "nginx.pid").read_text())
            targets.append(("nginx", ngx, "-", master))
        yield targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", type=int, nargs="+", default=[200, 500])
    ap.add_argument("--rate", type=float, default=50, help="events per second per stream")
    ap.add_argument("--seconds", type=float, default=10, help="length of each stream")
    ap.add_argument("--ramp", type=float, default=2.0, help="seconds over which streams open")
    ap.add_argument("--repeat", type=int, default=2, help="rounds per target; medians reported")
    ap.add_argument("--before", help="a directory with an earlier gateway package, run too")
    args = ap.parse_args()
    port = free_port()
    up = multiprocessing.Process(
        target=upstream_main, args=(port, args.rate, args.seconds), daemon=True
    )
    up.start()
    results: list[Wave] = []
    try:
        with _targets(f"http://127.0.0.1:{port}", args.before) as targets:
            for _, url, key, pid in targets:
                wave("warm-up", url, key, pid, 20, 0.0)
            for n in args.streams:
                for _ in range(args.repeat):
                    for target, url, key, pid in targets:  # alternated, same minute
                        w = wave(target, url, key, pid, n, args.ramp)
                        results.append(w)
                        print(
                            f"{target:<8} {n:>4} streams x {args.rate:g}/s: "
                            f"{w.cpu_us_per_event:5.1f} us CPU/event "
                            f"(kernel {w.system_us_per_event:4.1f}) | chunk delay "
                            f"p50 {w.delay_p50_ms:6.2f} ms p99 {w.delay_p99_ms:7.2f} ms | "
                            f"first event p99 {w.first_p99_ms:7.1f} ms | "
                            f"completed {w.completed}/{n} | {w.events} events",
                            flush=True,
                        )
    finally:
        up.terminate()
    print(f"medians ({args.repeat} rounds, {os.cpu_count()} cores, {args.seconds:g} s streams):")
    for n in args.streams:
        for target in dict.fromkeys(w.target for w in results):
            ws = [w for w in results if w.target == target and w.streams == n]
            print(
                f"  {target:<8} {n:>4} streams: "
                f"{statistics.median(w.cpu_us_per_event for w in ws):5.1f} us CPU/event "
                f"(kernel {statistics.median(w.system_us_per_event for w in ws):4.1f}), "
                f"delay p99 {statistics.median(w.delay_p99_ms for w in ws):7.2f} ms, "
                f"first p99 {statistics.median(w.first_p99_ms for w in ws):7.1f} ms, "
                f"completed {min(w.completed for w in ws)}/{n}"
            )


if __name__ == "__main__":
    main()
