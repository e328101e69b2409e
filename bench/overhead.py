"""Added latency and throughput of the gateway, against the upstream directly and nginx.

Starts the simulator, the gateway (one worker) and, when installed, nginx (one worker,
``proxy_pass`` with upstream keep-alive) on loopback, then drives each with wrk
(non-streaming create, same body) and prints, in one run:

- latency p50/p99 at 1 connection, and what each proxy adds to direct;
- requests/s at 16 connections, as a fraction of direct;
- the gateway's CPU time per request (its process's utime+stime / requests served);
- wrk's own CPU use, to show the load generator is not the bottleneck.

Run it against the package as production installs it (a clean ``pip install .``, no
test extras; the bench needs ``httpx`` and ``wrk``):

    python bench/overhead.py [--seconds 10] [--connections 16] [--before DIR]

``--before DIR`` runs a second gateway from the ``gateway`` package in DIR (e.g.
``git worktree add /tmp/before <commit>``) beside this one, on the same upstream, in the
same interleaved rounds: an A/B of a change in one run. ``--memory`` runs a second gateway
of this code on the memory state backend beside the default one (sqlite: each create's
binding is committed to the state file before the answer goes on): what durability costs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from common import BODY, cpu_seconds, free_port, servers, wait_ready

PATH = "/openai/v1/responses"


class WrkResult(NamedTuple):
    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    errors: int
    wrk_cpu: float  # wrk's CPU seconds per wall second


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, key: str, connections: int, seconds: float, tmp: Path) -> WrkResult:
    script = tmp / f"post-{abs(hash((url, key)))}.lua"
    script.write_text(
        textwrap.dedent(
            f"""
            wrk.method = "POST"
            wrk.body = {json.dumps(json.dumps(BODY))}
            wrk.headers["Content-Type"] = "application/json"
            wrk.headers["api-key"] = "{key}"
            """
        )
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            url + PATH,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    done = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if sock:
        errors += sum(int(n) for n in re.findall(r"\d+", sock.group(1)))
    assert done and rps and lat, out
    return WrkResult(
        _ms(lat["50"]),
        _ms(lat["99"]),
        float(rps.group(1)),
        int(done.group(1)),
        errors,
        cpu / wall,
    )


def median_result(results: list[WrkResult]) -> WrkResult:
    """Each figure's median over rounds (errors summed)."""
    fields = zip(*results, strict=True)
    med = [statistics.median(values) for values in fields]
    return WrkResult(med[0], med[1], med[2], int(med[3]), sum(r.errors for r in results), med[5])


@contextmanager
def nginx(upstream: str, tmp: Path) -> Iterator[str | None]:
    """nginx in front of ``upstream``, or None when nginx is not installed."""
    binary = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if binary is None:
        yield None
        return
    port = free_port()
    host_port = upstream.removeprefix("http://")
    conf = tmp / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            worker_processes 1;
            daemon off;
            pid {tmp}/nginx.pid;
            error_log {tmp}/nginx-error.log;
            events {{ worker_connections 4096; }}
            http {{
              access_log off;
              client_body_temp_path {tmp}/body;
              proxy_temp_path {tmp}/proxy;
              upstream sim {{ server {host_port}; keepalive 64; }}
              server {{
                listen 127.0.0.1:{port};
                location / {{
                  proxy_pass http://sim;
                  proxy_http_version 1.1;
                  proxy_set_header Connection "";
                  proxy_buffering off;
                }}
              }}
            }}
            """
        )
    )
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)], stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument(
        "--production",
        action="store_true",
        help="the gateway as production runs it: access log at INFO, audit trail on",
    )
    ap.add_argument("--before", help="a directory with an earlier gateway package, run too")
    ap.add_argument(
        "--memory",
        action="store_true",
        help="also run a gateway on the memory state backend (the default is sqlite)",
    )
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    pids: list[int] = []
    before_pids: list[int] = []
    memory_pids: list[int] = []
    memory_state = {"state": {"backend": "memory"}}
    with (
        tempfile.TemporaryDirectory() as tmpdir,
        servers(pids=pids, production=args.production) as (sim, gw, key),
        (
            servers(pids=before_pids, production=args.production, upstream=sim, code=args.before)
            if args.before
            else _none()
        ) as old,
        (
            servers(memory_state, memory_pids, production=args.production, upstream=sim)
            if args.memory
            else _none()
        ) as mem,
    ):
        tmp = Path(tmpdir)
        gateway_pids = {"gateway": pids[-1]}
        with nginx(sim, tmp) as ngx:
            targets = [("direct", sim, "sim-api-key")]
            if ngx:
                targets.append(("nginx", ngx, "sim-api-key"))
            targets.append(("gateway", gw, key))
            if old is not None:
                targets.append(("before", old[1], old[2]))
                gateway_pids["before"] = before_pids[-1]
            if mem is not None:
                targets.append(("memory", mem[1], mem[2]))
                gateway_pids["memory"] = memory_pids[-1]
            for _, url, k in targets:  # warm up every path
                wrk(url, k, 4, 2, tmp)
            print(
                f"wrk, non-streaming create, {args.seconds:g} s per case, one worker each, "
                f"median of {args.repeat} interleaved rounds"
                + (", gateway with INFO access log and audit on" if args.production else "")
            )
            rounds_one: dict[str, list[WrkResult]] = {name: [] for name, _, _ in targets}
            rounds_many: dict[str, list[WrkResult]] = {name: [] for name, _, _ in targets}
            cpu_rounds: dict[tuple[str, int], list[float]] = {
                (name, conns): [] for name in gateway_pids for conns in (1, args.connections)
            }
            for round_no in range(args.repeat):
                # Each round starts at another target: a fixed order favoured some slot
                # (two identical gateways measured 0.83 of each other in a fixed order).
                shift = round_no % len(targets)
                for name, url, k in targets[shift:] + targets[:shift]:
                    for conns, rounds in ((1, rounds_one), (args.connections, rounds_many)):
                        pid = gateway_pids.get(name)
                        c0 = cpu_seconds(pid) if pid else 0.0
                        result = wrk(url, k, conns, args.seconds, tmp)
                        rounds[name].append(result)
                        if pid:
                            spent = cpu_seconds(pid) - c0
                            cpu_rounds[name, conns].append(spent / result.requests * 1e6)
    one = {name: median_result(rs) for name, rs in rounds_one.items()}
    many = {name: median_result(rs) for name, rs in rounds_many.items()}
    cpu = {key: statistics.median(values) for key, values in cpu_rounds.items()}
    d1, dn = one["direct"], many["direct"]
    print(
        f"{'':<8} {'p50 @1':>9} {'p99 @1':>9} {'added p50':>10} {'added p99':>10} "
        f"{'req/s @' + str(args.connections):>11} {'of direct':>9} {'errors':>6} {'wrk cpu':>7}"
    )
    for name, _, _ in targets:
        r1, rn = one[name], many[name]
        print(
            f"{name:<8} {r1.p50_ms:8.3f}ms {r1.p99_ms:8.3f}ms {r1.p50_ms - d1.p50_ms:+9.3f}ms "
            f"{r1.p99_ms - d1.p99_ms:+9.3f}ms {rn.rps:11.0f} {rn.rps / dn.rps:9.2f} "
            f"{r1.errors + rn.errors:6d} {rn.wrk_cpu:7.2f}"
        )
    for name in gateway_pids:
        print(
            f"{name} CPU per request: {cpu[name, 1]:.0f} us at 1 connection, "
            f"{cpu[name, args.connections]:.0f} us at {args.connections}"
        )


@contextmanager
def _none() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
