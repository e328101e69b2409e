"""Real uvicorn servers on loopback for the tests: simulators and gateways."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.config import parse_config
from gateway.keys import hash_key, new_key
from gateway.server import uvicorn_config
from gateway.simulator import SimState, create_simulator


class Server:
    """A uvicorn server in a thread, on a socket bound before start, set up as in production."""

    def __init__(self, app: Any, header_timeout: float = 10.0, stock: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if stock:  # uvicorn's own protocol, as another ASGI server would run the app
            config = uvicorn.Config(app, lifespan="on", log_config=None, http="httptools")
        else:
            config = uvicorn_config(app, grace=2, header_timeout=header_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        if self.thread.is_alive():
            # Seen once in ~10 full runs (a gateway whose shutdown never finished, its batch
            # watcher still polling): say what it is waiting on; the thread is a daemon, so
            # the run still ends.
            self.server.force_exit = True
            self.thread.join(5)
            if self.thread.is_alive():
                _report_stuck(self)


def _report_stuck(server: Server) -> None:
    """Print the pending tasks of a server whose shutdown does not finish."""
    import asyncio
    import sys

    print(f"\nserver on port {server.port} did not stop; its pending tasks:", file=sys.stderr)
    for srv in getattr(server.server, "servers", []):
        loop = srv.get_loop()
        for task in asyncio.all_tasks(loop):
            print(f"  {task!r}", file=sys.stderr)
            task.print_stack(limit=8, file=sys.stderr)


@contextmanager
def serving(app: Any, header_timeout: float = 10.0, stock: bool = False) -> Iterator[Server]:
    server = Server(app, header_timeout, stock).start()
    try:
        yield server
    finally:
        server.stop()


class SocketServer:
    """A loopback TCP listener serving each connection in its own thread (``handle``),
    for upstreams and proxies whose bytes a test writes by hand."""

    def __init__(self, backlog: int = 64) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


@dataclass
class Sim:
    server: Server
    state: SimState

    @property
    def url(self) -> str:
        return self.server.url


@contextmanager
def simulator(region: str = "swedencentral") -> Iterator[Sim]:
    state = SimState(region=region)
    with serving(create_simulator(state)) as server:
        yield Sim(server, state)


@dataclass
class Tenants:
    """Fresh keys for the test tenants."""

    keys: dict[str, str] = field(default_factory=dict)

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            self.keys[tenant] = new_key()
        return self.keys[tenant]

    def entry(self, tenant: str, key_id: str | None = None) -> dict[str, str]:
        return {"id": key_id or f"{tenant}-key", "sha256": hash_key(self.key(tenant))}


def base_config(sims: dict[str, Sim], tenants: Tenants, **overrides: Any) -> dict[str, Any]:
    """Resources per simulator, model gpt-4.1 on all of them in order, tenants a and b."""
    resources = {
        name: {"endpoint": sim.url, "region": sim.state.region} for name, sim in sims.items()
    }
    cfg: dict[str, Any] = {
        "credential": {"type": "managed_identity"},
        "resources": resources,
        "models": {
            "gpt-4.1": [{"resource": n, "deployment": f"dep-41-{n}"} for n in sims],
            "gpt-4o-mini": [{"resource": n, "deployment": f"dep-4om-{n}"} for n in sims],
            "gpt-image-1": [{"resource": n, "deployment": f"dep-img-{n}"} for n in sims],
            "o3": [{"resource": n, "deployment": f"dep-o3-{n}"} for n in sims],
        },
        "tenants": {
            "team-a": {"keys": [tenants.entry("team-a")], "models": ["gpt-4*", "gpt-image-1"]},
            "team-b": {"keys": [tenants.entry("team-b")], "models": ["gpt-4.1"]},
        },
        # x-sim-*: the simulator's failure injection, sent through the gateway by the tests.
        "upstream": {"read_timeout": 5.0, "connect_timeout": 1.0, "forward_headers": ["x-sim-*"]},
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@contextmanager
def gateway(
    cfg: dict[str, Any], environ: dict[str, str] | None = None, stock: bool = False
) -> Iterator[Server]:
    loaded = parse_config(cfg, environ or {})
    header_timeout = loaded.config.server.header_timeout_seconds
    with serving(create_app(loaded), header_timeout, stock) as server:
        yield server


def redis_server(port: int, directory: str, *extra: str) -> subprocess.Popen[bytes]:
    """A redis-server on loopback ``port``, without persistence, quiet."""
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return subprocess.Popen(
        ["redis-server", *args, "--dir", directory, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class RedisServer:
    """A real redis-server on loopback, for the tests (no persistence)."""

    def __init__(self, tmpdir: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tmpdir = tmpdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = redis_server(self.port, self.tmpdir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
            c.sendall(b"FLUSHALL\r\n")
            c.recv(16)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class GatewayProcess:
    """`gateway serve` in its own process: a replica."""

    def __init__(
        self, cfg: dict[str, Any], tmpdir: str, env: dict[str, str], log_level: str = "WARNING"
    ) -> None:
        self.log_level = log_level
        import yaml

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.path = f"{tmpdir}/gateway-{self.port}.yaml"
        with open(self.path, "w") as f:
            yaml.safe_dump(cfg, f)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        import os
        import sys

        import httpx

        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--config",
                self.path,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                self.log_level,
            ],
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                httpx.get(self.url + "/healthz", timeout=0.5)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not start")

    def write_config(self, cfg: dict[str, Any] | str) -> None:
        import yaml

        with open(self.path, "w") as f:
            f.write(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))

    def stop(self, kill: bool = False) -> str:
        """Stop the process; returns what it wrote to stderr."""
        err = ""
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                # A shutdown that never finishes: ask the process what it waits on
                # (gateway serve prints its pending tasks on SIGUSR1), then end it.
                import signal

                self.proc.send_signal(signal.SIGUSR1)
                time.sleep(1)
                self.proc.kill()
                self.proc.wait(10)
                dump = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                if self.proc.stderr:
                    self.proc.stderr.close()
                self.proc = None
                raise RuntimeError(
                    f"gateway did not stop within 30 s; its tasks:\n{dump[-6000:]}"
                ) from None
            if self.proc.stderr:
                err = self.proc.stderr.read().decode(errors="replace")
                self.proc.stderr.close()
            self.proc = None
        return err


def _cluster_port(taken: list[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    import random

    while True:
        port = random.randint(20000, 45000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port


class RedisClusterServer:
    """A real 3-primary Redis Cluster on loopback (no replicas), for the tests.

    ``cluster-require-full-coverage no``: with one shard down, the others keep serving
    their slots (the setting the gateway's README asks for).
    """

    def __init__(self, tmpdir: str, size: int = 3) -> None:
        self.tmpdir = tmpdir
        self.ports: list[int] = []
        while len(self.ports) < size:
            self.ports.append(_cluster_port(self.ports))
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start_node(self, port: int) -> None:
        node_dir = f"{self.tmpdir}/node-{port}"
        import os

        os.makedirs(node_dir, exist_ok=True)
        self.procs[port] = redis_server(
            port,
            node_dir,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            "2000",
            "--cluster-require-full-coverage",
            "no",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.command(port, "PING").startswith("+PONG"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {port} did not start")

    def command(self, port: int, *words: str) -> str:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                parts = [f"${len(w)}\r\n{w}\r\n" for w in words]
                c.sendall(f"*{len(words)}\r\n{''.join(parts)}".encode())
                return c.recv(65536).decode(errors="replace")
        except OSError:
            return ""

    def start(self) -> RedisClusterServer:
        for port in self.ports:
            self.start_node(port)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in self.command(p, "CLUSTER", "INFO") for p in self.procs):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ready")

    def port_of_slot(self, slot: int) -> int:
        """The port of the primary serving ``slot`` (slots split evenly at create)."""
        per = 16384 // len(self.ports)
        return self.ports[min(slot // per, len(self.ports) - 1)]

    def flush(self) -> None:
        for port in self.procs:
            self.command(port, "FLUSHALL")

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
            proc.wait(10)
        self.procs.clear()
