"""uvicorn, set up on purpose: its limits, and a timeout on header blocks that stall.

uvicorn arms its keep-alive timer only after a response, so a connection that sends
half a request head and then nothing would stay open for ever. ``HeaderTimeoutProtocol``
closes a connection whose request head is not complete ``header_timeout`` seconds
after its first byte (or after the connection opened). Bodies that stall are cut by
the gateway itself (``server.body_timeout_seconds``, 408).

The uvicorn settings chosen here:
- ``timeout_keep_alive`` = ``server.keepalive_timeout_seconds`` (75 s, longer than the
  60 s idle timeout of Azure's and most ingresses' upstream pools, so the ingress
  closes first and never reuses a connection we just closed);
- ``h11_max_incomplete_event_size`` 64 KiB (the request head limit for h11; httptools
  has its own of 80 KiB);
- ``backlog`` 2048; no ``limit_concurrency`` (quotas and the upstream pool bound work);
- no proxy headers (the gateway decides whom to trust: ``server.trusted_proxies``),
  no ``server`` header, no uvicorn access log (the gateway writes its own).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport that sends a response head together with what follows it.

    uvicorn writes a response's head and its body separately; for a JSON answer that is
    two system calls and usually two TCP segments. A head (a write starting with
    ``HTTP/1.1 ``) is held until the next write, which takes it along, or until the end
    of the current loop turn (``call_soon``), or ``close``/``write_eof``: nothing is
    reordered or lost, and every other write (a stream's chunks) leaves at once.
    """

    __slots__ = ("_head", "_loop", "_t")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data.startswith(b"HTTP/1.1 "):
            self._head = data
            self._loop.call_soon(self._flush)
            return
        if data and not self._t.is_closing():
            self._t.write(data)

    def _flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._t.is_closing():
                self._t.write(head)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def write_eof(self) -> None:
        self._flush()
        self._t.write_eof()

    def abort(self) -> None:
        self._head = None
        self._t.abort()

    def raw(self) -> asyncio.Transport:
        """The transport itself, a held head sent first (for writes that need no holding)."""
        self._flush()
        return self._t

    def get_write_buffer_size(self) -> int:
        return self._t.get_write_buffer_size() + len(self._head or b"")

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading…
        return getattr(self._t, name)


CLIENT_GONE = "gateway.client_gone"
# ASGI extension: {"writer": DirectWriters}, chunked body writes straight to the transport.
DIRECT = "gateway.direct"
# ASGI extension: {"at": time.perf_counter()} when the request's first byte was read.
RECEIVED = "gateway.received"


class ClientGone:
    """The ASGI extension ``gateway.client_gone`` (``scope["extensions"]``, its ``hook``),
    one per connection: callbacks run when the client's connection is lost.

    A relay that may run for minutes registers one instead of keeping a task of its own
    waiting on ``receive()`` for ``http.disconnect`` (per open stream: a task, its
    coroutines, a future and a context less). Under another ASGI server the extension is
    absent and the relay falls back to that task.
    """

    __slots__ = ("_callbacks", "lost")

    def __init__(self) -> None:
        self.lost = False
        self._callbacks: set[Callable[[], None]] = set()

    def add(self, callback: Callable[[], None]) -> None:
        if self.lost:
            callback()
        else:
            self._callbacks.add(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        self._callbacks.discard(callback)

    def fire(self) -> None:
        self.lost = True
        callbacks, self._callbacks = self._callbacks, set()
        for callback in callbacks:
            callback()


class BodyWriter:
    """A started chunked response's body, written to the connection's transport at once.

    For a relay at token rate: one ``write`` per upstream read, no ``send`` coroutine.
    The relay still starts and ends the response through ASGI ``send`` (uvicorn keeps
    its own state); in between, ``write`` frames each piece as an HTTP chunk. ``write``
    returns False when the client's buffer is over its high-water mark: the caller stops
    reading its source and awaits ``drain``.
    """

    __slots__ = ("_flow", "_t")

    def __init__(self, transport: asyncio.Transport, flow: Any) -> None:
        self._t = transport
        self._flow = flow

    def write(self, data: bytes) -> bool:
        t = self._t
        if not t.is_closing():
            t.write(b"%x\r\n%b\r\n" % (len(data), data))
        return not self._flow.write_paused

    @property
    def paused(self) -> bool:
        return bool(self._flow.write_paused)

    async def drain(self) -> None:
        await self._flow.drain()


class DirectWriters:
    """The ASGI extension ``gateway.direct`` (its ``writer``), one per connection."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: HttpToolsProtocol) -> None:
        self._protocol = protocol

    def __call__(self, scope: Any) -> BodyWriter | None:
        """A writer for ``scope``'s response once started chunked; None otherwise."""
        cycle = self._protocol.cycle
        if (
            cycle is None
            or cycle.scope is not scope
            or not cycle.response_started
            or cycle.response_complete
            or cycle.disconnected
            or cycle.chunked_encoding is not True
            or scope.get("method") == "HEAD"
        ):
            return None
        t = cycle.transport
        raw = t.raw() if isinstance(t, CoalescingTransport) else t
        return BodyWriter(raw, cycle.flow)


def direct_writer(scope: Any) -> BodyWriter | None:
    """The direct body writer for ``scope``'s started response, when the server has one."""
    ext = (scope.get("extensions") or {}).get(DIRECT)
    writers = ext.get("writer") if isinstance(ext, dict) else None
    return writers(scope) if isinstance(writers, DirectWriters) else None


def tune_gc(freeze: bool, thresholds: tuple[int, int, int]) -> None:
    """Set up Python's cyclic garbage collector for a server process.

    The gateway's traffic makes no reference cycles (a full collection under mixed
    traffic, streams, errors and cut streams included, finds nothing: ``bench/soak.py``),
    so the collector only costs pauses, and a pause delays every open stream at once:
    with 1,000 streams, a full collection walks ~120,000 objects for 60-80 ms, the
    gen-1 collections of a burst 3-6 ms each. So:

    - ``freeze``: what exists once the app is built (modules, config, clients, ~50,000
      objects) moves to the permanent generation, never walked again;
    - ``thresholds`` (default 5,000 / 1 / 1,000, Python's 700 / 10 / 10): young
      collections rarer, the middle generation collected every other time so it stays
      small (short pauses: this beat 2,000 / 4 and 2,000 / 1 in ``bench/streams.py``),
      and a full collection about a hundred times rarer; it remains as a safety net.
    """
    gc.collect()
    if freeze:
        gc.freeze()
    gc.set_threshold(*thresholds)


def protocol_with_header_timeout(seconds: float) -> type[HttpToolsProtocol]:
    """An httptools protocol class whose request heads must complete in ``seconds``."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_open = False  # a request head has begun and is not complete yet

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._gone = ClientGone()
            self._gone_ext: dict[object, object] = {"hook": self._gone}  # ASGI: a dict each
            self._direct_ext: dict[object, object] = {"writer": DirectWriters(self)}
            coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
            super().connection_made(coalescing)  # type: ignore[arg-type]
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Armed only when a head is still incomplete after what arrived: a head that
            # comes whole in one read (nearly every request) costs no timer.
            if self._head_open:
                self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            received: dict[object, object] = {"at": time.perf_counter()}  # the clock starts
            self.scope["extensions"] = {
                CLIENT_GONE: self._gone_ext,
                RECEIVED: received,
                DIRECT: self._direct_ext,
            }
            self._head_open = True

        def on_headers_complete(self) -> None:
            self._head_open = False
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)
            self._gone.fire()

    return HeaderTimeoutProtocol


def uvicorn_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "info",
    grace: float = 30,
    header_timeout: float = 10.0,
    keepalive: float = 75.0,
) -> uvicorn.Config:
    """The uvicorn config the gateway runs with."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_with_header_timeout(header_timeout),
        log_config=None,
        log_level=log_level,
        access_log=False,
        server_header=False,
        date_header=True,
        proxy_headers=False,
        lifespan="on",
        timeout_keep_alive=int(keepalive + 0.999),
        h11_max_incomplete_event_size=64 * 1024,
        backlog=2048,
        timeout_graceful_shutdown=int(grace + 0.999),
    )


def on_signal(sig: int, handler: Callable[[], None]) -> Callable[[], None] | None:
    """Run ``handler`` on ``sig`` in the running loop; returns the undo, or None where the
    loop cannot own signals (not the main thread: a server run in a thread, as the tests
    do)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(sig, handler)
    except (RuntimeError, ValueError, NotImplementedError):
        return None

    def undo() -> None:
        loop.remove_signal_handler(sig)

    return undo
