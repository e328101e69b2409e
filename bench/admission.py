"""Cost of quota admission per backend: added latency with quotas on vs off, in one run.

For each case (no quotas; quotas on the memory backend; quotas on Redis) a fresh
gateway is started in front of the simulator and measured at a fixed concurrency;
the printed "added" figures are against the no-quota gateway of the same run.

    python bench/admission.py [--requests 2000] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from common import pct, run, servers, timed_json

QUOTAS = {
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 1_000_000_000,
    "tokens_per_day": 10_000_000_000,
    "max_concurrent_requests": 10_000,
}


@contextmanager
def redis_server() -> Iterator[str]:
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def measure(n: int, c: int, extra: dict[str, object]) -> list[float]:
    with servers(extra) as (_, gw, key):
        return asyncio.run(run(n, c, timed_json(gw + "/openai/v1/responses", {"api-key": key})))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    with redis_server() as url:
        os.environ["BENCH_REDIS_URL"] = url
        base = measure(args.requests, args.concurrency, {})
        cases = {
            "memory": {"quotas": QUOTAS, "state": {"backend": "memory"}},
            "redis": {
                "quotas": QUOTAS,
                "state": {"backend": "redis", "url_env": "BENCH_REDIS_URL"},
            },
        }
        b50, b99 = pct(base, 50), pct(base, 99)
        print(f"{args.requests} requests per case, concurrency {args.concurrency}")
        print(f"{'no quotas':<16} p50 {b50:7.3f} ms p99 {b99:7.3f} ms")
        for name, extra in cases.items():
            v = measure(args.requests, args.concurrency, extra)
            g50, g99 = pct(v, 50), pct(v, 99)
            print(
                f"{'quotas, ' + name:<16} p50 {g50:7.3f} ms p99 {g99:7.3f} ms | "
                f"added p50 {g50 - b50:+7.3f} ms p99 {g99 - b99:+7.3f} ms"
            )


if __name__ == "__main__":
    main()
