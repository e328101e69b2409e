"""The direct path of a relayed stream (``gateway/pump.py``): flow control both ways,
the upstream's read timeout, a broken upstream, and the same bytes as the task path."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
from harness import Sim, SocketServer, Tenants, base_config, gateway

from gateway.keys import new_key

URL = "/openai/v1/responses"
BODY = {"model": "gpt-4.1", "input": "x", "stream": True}


def _event(kind: str, seq: int, **extra: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": seq, **extra})
    return f"event: {kind}\ndata: {data}\n\n".encode()


class Firehose(SocketServer):
    """An upstream that streams ``total`` bytes of delta events as fast as it may write,
    counting what the gateway took off its socket (``sent``); then ``response.completed``."""

    def __init__(self, total: int, cut: bool = False) -> None:
        super().__init__()
        self.total = total
        self.cut = cut  # break off mid-stream (no terminal event, no last chunk)
        self.sent = 0
        self.body = bytearray()  # the SSE bytes, as the client must see them
        self.done = threading.Event()

    def handle(self, conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += conn.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            rest += conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        events = [_event("response.created", 0, response={"id": "resp_" + "f" * 40})]
        seq = 1
        delta = "x" * 900
        size = len(events[0])
        while size < self.total:
            ev = _event("response.output_text.delta", seq, item_id="msg_1", delta=delta)
            events.append(ev)
            size += len(ev)
            seq += 1
        if not self.cut:
            usage = {"input_tokens": 1, "output_tokens": seq, "total_tokens": seq + 1}
            done = {"id": "resp_" + "f" * 40, "status": "completed", "usage": usage}
            events.append(_event("response.completed", seq, response=done))
        try:
            for ev in events:
                framed = b"%x\r\n%s\r\n" % (len(ev), ev)
                conn.sendall(framed)
                self.sent += len(ev)
                self.body += ev
            if not self.cut:
                conn.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            self.done.set()
            conn.close()


def _request(port: int, key: str) -> socket.socket:
    body = json.dumps(BODY).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a small window
    s.sendall(
        f"POST {URL} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        f"api-key: {key}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )
    return s


def _dechunk(raw: bytes) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    out = bytearray()
    at = 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2 : end + 2 + size]
        assert body[end + 2 + size : end + 4 + size] == b"\r\n"
        at = end + 4 + size


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while data := s.recv(1 << 20):
        chunks.append(data)
    s.close()
    return b"".join(chunks)


def _config(tenants: Tenants, upstream: str, **upstream_cfg: Any) -> dict[str, Any]:
    sims: dict[str, Any] = {}
    cfg = base_config(sims, tenants)
    cfg["resources"] = {
        "fire": {"endpoint": upstream, "region": "swedencentral", "auth": "api_key"}
    }
    cfg["resources"]["fire"]["api_key_env"] = "FIRE_KEY"
    cfg["models"] = {"gpt-4.1": [{"resource": "fire", "deployment": "d"}]}
    cfg["tenants"]["team-a"]["models"] = ["gpt-4*"]  # every entry must match a model
    cfg["upstream"].update(upstream_cfg)
    return cfg


def test_a_slow_client_pauses_the_upstream(tenants: Tenants) -> None:
    """A client that stops reading: the gateway stops reading the upstream (only the
    kernels' socket buffers fill), then relays every byte, exactly, once it reads."""
    fire = Firehose(total=96 * 1024 * 1024)
    try:
        with gateway(_config(tenants, fire.url), {"FIRE_KEY": new_key()}) as gw:
            s = _request(gw.port, tenants.key("team-a"))
            first = s.recv(4096)  # the head and the first events; then nothing for a while
            time.sleep(1.5)
            held = fire.sent
            time.sleep(0.5)
            assert fire.sent == held  # the upstream is paused, not read into memory
            assert held < 40 * 1024 * 1024, held
            raw = first + _read_all(s)
            assert fire.done.wait(10)
    finally:
        fire.close()
    body = _dechunk(raw)
    assert len(body) > 96 * 1024 * 1024
    assert body == bytes(fire.body)  # byte for byte, the terminal event included


def test_an_upstream_cut_mid_stream_gets_the_closing_error(tenants: Tenants) -> None:
    fire = Firehose(total=256 * 1024, cut=True)
    try:
        with gateway(_config(tenants, fire.url), {"FIRE_KEY": new_key()}) as gw:
            r = httpx.post(
                gw.url + URL, json=BODY, headers={"api-key": tenants.key("team-a")}, timeout=20
            )
    finally:
        fire.close()
    assert r.status_code == 200
    assert r.content.startswith(bytes(fire.body))  # everything the upstream sent, then
    last = json.loads(r.content.rstrip().rsplit(b"data: ", 1)[1])
    assert last["type"] == "error" and last["code"] == "upstream_stream_interrupted"


def test_a_stalled_stream_times_out_on_the_direct_path(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants)
    cfg["upstream"]["read_timeout"] = 0.4
    with gateway(cfg) as gw:
        started = time.monotonic()
        r = httpx.post(
            gw.url + URL,
            json=BODY,
            headers={"api-key": tenants.key("team-a"), "x-sim-delay": "2"},
            timeout=20,
        )
        took = time.monotonic() - started
    assert r.status_code == 200
    last = json.loads(r.content.rstrip().rsplit(b"data: ", 1)[1])
    assert last["type"] == "error" and "did not answer in time" in last["message"]
    assert took < 1.5  # the read timeout, not the stream's own pace


def test_both_paths_send_the_same_bytes(identity: Sim, tenants: Tenants) -> None:
    """The direct path (the gateway's server) and the task path (stock uvicorn: no
    ``gateway.direct`` extension) relay the simulator's stream identically."""
    cfg = base_config({"swc": identity}, tenants)
    bodies = []
    for stock in (False, True):
        with gateway(cfg, stock=stock) as gw:
            r = httpx.post(
                gw.url + URL,
                json={**BODY, "input": "one two three four five"},
                headers={"api-key": tenants.key("team-a"), "x-sim-seed": "7"},
                timeout=20,
            )
            assert r.status_code == 200
            bodies.append(_normalise(r.content))
    assert bodies[0] == bodies[1]


def _normalise(body: bytes) -> list[str]:
    """Event types in order (ids and timestamps differ between two runs)."""
    return [
        json.loads(line[6:])["type"] for line in body.split(b"\n") if line.startswith(b"data: ")
    ]
