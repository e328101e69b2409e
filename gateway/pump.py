"""The direct path of a relayed stream: upstream bytes handed on without a task wake-up.

A streamed answer at token rate is one small chunk per token. Read through aiohttp's
body stream, each chunk wakes the relay's task (a future, a task step, a coroutine
chain down to ``readany``) and goes out through the server's ``send`` coroutine. Here
the upstream connection's protocol is swapped, for the rest of the answer, for a
``Pump`` that feeds what arrives through aiohttp's own protocol (so llhttp still does
the HTTP framing: chunk sizes, the end, errors), takes the decoded bytes it buffered
and hands them to a ``Receiver`` at once, in the same loop turn as the read: the
receiver writes them to the client's transport. All bytes received in a read leave in
one write; nothing waits to batch.

The relay's task sleeps meanwhile and wakes only when there is work that must wait:
binding a response id or writing audit records before the bytes that carry them go
on, a client that reads slower than the upstream writes (the upstream is paused until
the client's buffer drains: memory per stream stays bounded), the end, an error.

The upstream read timeout (``upstream.read_timeout``) becomes one timer per stream
re-armed lazily from the time of the last read, instead of aiohttp's cancel-and-create
per read; a paused upstream does not time out (it is the client that is slow).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from aiohttp.client_exceptions import SocketTimeoutError

if TYPE_CHECKING:
    from aiohttp import StreamReader
    from aiohttp.client_proto import ResponseHandler


class Receiver(Protocol):
    """Where a pump hands its bytes and its end."""

    def data(self, chunk: bytes) -> bool:
        """Take ``chunk``; False to pause the upstream until the pump's ``resume``."""
        ...

    def ended(self, error: BaseException | None) -> None: ...


class Pump(asyncio.Protocol):
    """The upstream connection's protocol while a streamed answer is pumped."""

    __slots__ = (
        "_clock",
        "_ended",
        "_feed",
        "_handler",
        "_last",
        "_loop",
        "_paused",
        "_payload",
        "_receiver",
        "_timeout",
        "_timer",
        "_transport",
    )

    def __init__(
        self,
        handler: ResponseHandler,
        payload: StreamReader,
        transport: asyncio.Transport,
        receiver: Receiver,
        timeout: float | None,
    ) -> None:
        self._handler = handler
        self._payload = payload
        self._transport = transport
        self._receiver = receiver
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._clock = self._loop.time
        self._feed = handler.data_received
        self._last = self._clock()
        self._paused = False
        self._ended = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Take the connection over; hand on what aiohttp has already buffered."""
        handler = self._handler
        handler.read_timeout = None  # ours from now on (no timer per read)
        handler._drop_timeout()
        self._transport.set_protocol(self)
        if self._timeout:
            self._timer = self._loop.call_later(self._timeout, self._check_idle)
        self._deliver()

    def restore(self) -> None:
        """Give the connection back to aiohttp's protocol (before it is released)."""
        self._ended = True
        self._cancel_timer()
        if self._paused:
            self.resume()
        if not self._transport.is_closing():
            self._transport.set_protocol(self._handler)

    def pause(self) -> None:
        """Stop reading from the upstream (the client is slow, or the relay has work)."""
        if not self._paused and not self._ended:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._last = self._loop.time()
            if not self._transport.is_closing():
                self._transport.resume_reading()

    # asyncio.Protocol: everything still goes through aiohttp's protocol first.

    def data_received(self, data: bytes) -> None:  # the hot path: one call per upstream read
        self._last = self._clock()
        self._feed(data)
        self._deliver()

    def eof_received(self) -> None:
        self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._handler.connection_lost(exc)
        self._deliver()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def _deliver(self) -> None:
        if self._ended:
            return
        payload = self._payload
        try:
            chunk = payload.read_nowait(-1)
        except Exception as exc:  # aiohttp's payload error (a broken chunk, a reset)
            self._end(exc)
            return
        if chunk and not self._receiver.data(chunk):
            self.pause()
        if payload.at_eof():
            self._end(None)

    def _end(self, error: BaseException | None) -> None:
        self._ended = True
        self._cancel_timer()
        self._receiver.ended(error)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_idle(self) -> None:
        assert self._timeout is not None
        self._timer = None
        if self._ended:
            return
        idle = self._loop.time() - self._last
        if self._paused or idle < self._timeout:
            wait = self._timeout if self._paused else self._timeout - idle
            self._timer = self._loop.call_later(wait, self._check_idle)
            return
        self._end(SocketTimeoutError("Timeout on reading data from socket"))
