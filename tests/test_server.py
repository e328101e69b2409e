"""The server set-up: a response head leaves with what follows it; the collector tuned;
the client-gone extension."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from typing import Any

from harness import Server, Tenants, serving

from gateway.server import CLIENT_GONE, ClientGone, CoalescingTransport, tune_gc


class Recording:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_head_joins_the_body_and_streams_are_not_held() -> None:
    async def run() -> list[list[bytes]]:
        loop = asyncio.get_running_loop()
        rec = Recording()
        t = CoalescingTransport(rec, loop)  # type: ignore[arg-type]
        seen = []
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert t.get_write_buffer_size() == 19 and rec.writes == []
        t.write(b"{}")
        seen.append(list(rec.writes))
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")  # a head alone leaves at the end of the turn
        await asyncio.sleep(0)
        seen.append(list(rec.writes))
        t.write(b"chunk-1")  # stream chunks go at once
        t.write(b"chunk-2")
        seen.append(list(rec.writes))
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        t.close()  # close flushes first
        seen.append(list(rec.writes))
        assert rec.closed and t.get_extra_info("peername") == "info:peername"
        return seen

    seen = asyncio.run(run())
    assert seen[0] == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    assert seen[1][1:] == [b"HTTP/1.1 200 OK\r\n\r\n"]
    assert seen[2][2:] == [b"chunk-1", b"chunk-2"]
    assert seen[3][-1] == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_a_json_answer_arrives_in_one_segment(gw: Server, tenants: object) -> None:
    """Head and body in one send: the first recv holds the whole answer."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        data = s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b'{"status":"ok"}'


def test_tune_gc_freezes_what_exists_and_sets_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(True, (2000, 4, 1000))
        assert gc.get_threshold() == (2000, 4, 1000)
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # modules, config, test objects: never walked again
        kept = [[n] for n in range(1000)]  # made after the freeze: still collected normally
        # Not frozen: the count never grows (it may shrink: a frozen object that another
        # test's thread lets go of leaves the permanent generation).
        assert all(gc.is_tracked(x) for x in kept) and gc.get_freeze_count() <= frozen
        gc.unfreeze()
        tune_gc(False, (700, 10, 10))
        assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_client_gone_extension_fires_once_per_lost_connection() -> None:
    """Every request's scope carries its connection's hook; losing the connection runs
    the callbacks registered on it, and a callback added after the loss runs at once."""
    hooks: list[object] = []
    fired = threading.Event()
    late = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        hook = scope["extensions"][CLIENT_GONE]["hook"]
        hooks.append(hook)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/hold":
            gone = asyncio.Event()
            hook.add(gone.set)
            hook.add(fired.set)
            await gone.wait()
            hook.add(late.set)  # the connection is gone already: runs now
            return
        await send({"type": "http.response.body", "body": b"ok"})

    with serving(app) as server, socket.create_connection(("127.0.0.1", server.port)) as s:
        for path in ("/a", "/b"):  # two requests on one kept-alive connection
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            assert b"ok" in s.recv(65536)
        s.sendall(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.close()
        assert fired.wait(5) and late.wait(5)
    assert len(hooks) == 3 and hooks[0] is hooks[1] is hooks[2]
    assert isinstance(hooks[0], ClientGone) and hooks[0].lost


def test_the_clock_starts_at_the_first_byte(gw: Server, tenants: Tenants) -> None:
    """A request whose head trickles in for 0.4 s is timed from its first byte (the server
    protocol knows it), not from when the handler got its turn."""
    import json as _json
    import logging
    import socket as _socket

    seen: list[dict[str, object]] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.__dict__)  # type: ignore[method-assign]
    logger = logging.getLogger("gateway.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        host, port = gw.url.removeprefix("http://").split(":")
        body = _json.dumps({"model": "gpt-4.1", "input": "x"}).encode()
        head = (
            f"POST /openai/v1/responses HTTP/1.1\r\nhost: x\r\napi-key: {tenants.key('team-a')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        with _socket.create_connection((host, int(port))) as s:
            s.sendall(head[:20])
            time.sleep(0.4)
            s.sendall(head[20:] + body)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 3
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
    assert seen and float(seen[-1]["duration_ms"]) >= 400  # type: ignore[arg-type]


def test_event_loop_lag_is_measured() -> None:
    import asyncio
    from types import SimpleNamespace

    from gateway import app as app_module
    from gateway.metrics import Metrics

    metrics = Metrics(lambda: None)  # type: ignore[arg-type, return-value]
    gateway = SimpleNamespace(loop_lag=0.0)

    async def run() -> float:
        meter = asyncio.ensure_future(app_module._measure_loop_lag(gateway, metrics))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        time.sleep(0.4)  # noqa: ASYNC251 (starving the loop on purpose: the timer fires late)
        await asyncio.sleep(0.02)
        meter.cancel()
        return float(gateway.loop_lag)

    assert asyncio.run(run()) >= 0.1
    assert metrics.loop_lag._value.get() >= 0.1
