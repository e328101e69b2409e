"""Pure-ASGI relays of an upstream answer: JSON as received, SSE byte for byte.

A relay only relays: it closes its upstream response in a ``finally`` and raises on
failure; answering errors, settling quotas and telling observers is the lifecycle
owner's job (``lifecycle.Operation``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from .errors import GatewayError
from .exchange import Exchange
from .headers import response_headers
from .lifecycle import chunk_sender
from .quotas import ratelimit_headers
from .server import CLIENT_GONE, BodyWriter, ClientGone, direct_writer
from .sse import chat_error_chunk, stream_error_event
from .upstream import UpstreamResponse

if TYPE_CHECKING:
    from .answers import Answer
    from .runtime import Gateway

log = logging.getLogger("gateway.relay")


def quota_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """The tenant's own ``x-ratelimit-*`` headers, when a quota applies."""
    if ex.admission is None:
        return []
    return [(k.encode(), v.encode()) for k, v in ratelimit_headers(ex.admission).items()]


class _UpstreamRelay:
    """An upstream answer to relay; ``answer`` (the response hook) hears what it carries."""

    def __init__(
        self, upstream: UpstreamResponse, ex: Exchange, gw: Gateway, answer: Answer
    ) -> None:
        self.upstream = upstream
        self.ex = ex
        self.gw = gw
        self.answer = answer
        self._task: asyncio.Task[Any] | None = None
        self._gone = False  # the client went away: the relay's cancel is our own
        self._hook: ClientGone | None = None
        self._watcher: asyncio.Future[None] | None = None

    def _watch_client(self, scope: Scope, receive: Receive) -> None:
        """Cancel this relay when the client goes away (its upstream is closed then).

        uvicorn's ``send`` to a gone client returns without a word, so a relay that only
        sends would read its upstream to the end. The server protocol tells us through
        the ``gateway.client_gone`` extension; under another ASGI server a task waits on
        ``receive()`` for ``http.disconnect``.
        """
        self._task = asyncio.current_task()
        ext = (scope.get("extensions") or {}).get(CLIENT_GONE)
        hook = ext.get("hook") if isinstance(ext, dict) else None
        if isinstance(hook, ClientGone):
            self._hook = hook
            hook.add(self._client_gone)
        else:
            self._watcher = asyncio.ensure_future(self._watch_disconnect(receive))

    def _unwatch_client(self) -> None:
        if self._hook is not None:
            self._hook.discard(self._client_gone)
        if self._watcher is not None:
            self._watcher.cancel()

    def _client_gone(self) -> None:
        assert self._task is not None
        self.ex.interrupted = True
        self._gone = True
        self._task.cancel()

    def _was_client_gone(self) -> bool:
        """On a cancel: whether it was ours (then undone, and the relay just ends)."""
        if self._gone and self._task is not None:
            self._task.uncancel()
            return True
        return False

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._client_gone()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The answer's headers: the upstream's (cleaned), ours, the tenant's quota."""
        return response_headers(self.upstream.raw_headers, self.ex.request_id) + quota_headers(
            self.ex
        )


class JsonRelay(_UpstreamRelay):
    """A non-streamed upstream answer, read whole and passed on unchanged."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex, resp = self.ex, self.upstream
        try:
            raw = await resp.read()
        finally:
            resp.close()
        ex.upstream_seconds = time.perf_counter() - (ex.upstream_started or ex.started)
        if resp.status < 300:
            raw = await self.answer.body(raw, resp.headers.get("content-type", ""))
        headers = self.headers()
        headers.append((b"content-length", str(len(raw)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})
        ex.ttfb_seconds = time.perf_counter() - ex.started


class RawRelay(_UpstreamRelay):
    """A binary answer (audio, file content) streamed through unchanged as it arrives."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex, resp = self.ex, self.upstream
        headers = self.headers()
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit():
            headers.append((b"content-length", length.encode()))
        self._watch_client(scope, receive)
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            middle = chunk_sender(send)
            async for chunk in resp.chunks():
                await middle({"type": "http.response.body", "body": chunk, "more_body": True})
                if ex.ttfb_seconds is None:
                    ex.ttfb_seconds = time.perf_counter() - ex.started
            await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            if self._was_client_gone():
                return  # the upstream is closed below
            raise
        finally:
            self._unwatch_client()
            resp.close()
            ex.upstream_seconds = time.perf_counter() - (ex.upstream_started or ex.started)


class StreamRelay(_UpstreamRelay):
    """An upstream SSE stream relayed byte for byte, each chunk sent as it arrives.

    A client disconnect (seen by a watcher task) cancels the relay and closes the
    upstream stream. An upstream that breaks off, or ends without a terminal event,
    gets a closing ``error`` event so SDKs raise instead of seeing a silent end.
    """

    def __init__(
        self, upstream: UpstreamResponse, ex: Exchange, gw: Gateway, answer: Answer
    ) -> None:
        super().__init__(upstream, ex, gw, answer)
        self.chat = ex.api == "chat"
        # Only Responses and chat streams have a terminal event to miss.
        self.checks_end = ex.api != "other"
        self.tap = answer.tap
        ex.stream = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex, gw, resp = self.ex, self.gw, self.upstream
        headers = self.headers()
        self._watch_client(scope, receive)
        try:
            ex.stream_relayed = True
            for obs in gw.observers:
                obs.stream_started(ex)
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await self._relay(scope, send)
        except asyncio.CancelledError:
            if self._was_client_gone():
                return  # the upstream is closed below
            raise
        finally:
            self._unwatch_client()
            resp.close()
            ex.upstream_seconds = time.perf_counter() - (ex.upstream_started or ex.started)
            await self.answer.ended()

    async def _relay(self, scope: Scope, send: Send) -> None:
        resp, tap = self.upstream, self.tap
        try:
            writer = direct_writer(scope)
            if writer is None or not await self._pumped(writer):
                await self._iterated(send)
        except GatewayError as exc:
            self._broke_off("upstream_stream_interrupted", f"{exc.code}")
            message = f"The upstream stream broke off ({exc.message})"
            await send({"type": "http.response.body", "body": self._error(message)})
            return
        tap.close()
        if tap.final_type is None and resp.status < 300 and not tap.disabled and self.checks_end:
            self._broke_off("upstream_stream_incomplete", "no terminal event")
            message = "The upstream stream ended without a terminal event."
            await send({"type": "http.response.body", "body": self._error(message)})
            return
        await send({"type": "http.response.body", "body": b""})

    async def _iterated(self, send: Send) -> None:
        """The relay over aiohttp's body stream: a task step per upstream read."""
        ex, tap, answer = self.ex, self.tap, self.answer
        middle = chunk_sender(send)
        async for chunk in self.upstream.chunks():
            tap.feed(chunk)
            if answer.has_work():
                await answer.work()
            await middle({"type": "http.response.body", "body": chunk, "more_body": True})
            if ex.ttfb_seconds is None:
                ex.ttfb_seconds = time.perf_counter() - ex.started

    async def _pumped(self, writer: BodyWriter) -> bool:
        """The relay on the direct path (``pump``): reads go to the client in the loop
        turn that made them; this task wakes only for work, a slow client or the end.
        False when the upstream connection cannot be pumped (then ``_iterated``)."""
        loop = asyncio.get_running_loop()
        direct = _Direct(self, writer, loop.create_future())
        pump = self.upstream.pump(direct)
        if pump is None:
            return False
        while True:
            await direct.wake
            direct.wake = loop.create_future()
            if self.answer.has_work():
                await self.answer.work()
            if direct.held:
                held, direct.held = direct.held, []
                direct.write(held[0] if len(held) == 1 else b"".join(held))
            if direct.done:
                if direct.error is not None:
                    raise self.upstream.failure(direct.error)
                return True
            if writer.paused:
                await writer.drain()
            pump.resume()

    def _broke_off(self, code: str, reason: str) -> None:
        self.ex.interrupted = True
        self.ex.error_code = code
        log.warning(
            "upstream stream broke off", extra={"request_id": self.ex.request_id, "reason": reason}
        )

    def _error(self, message: str) -> bytes:
        code = self.ex.error_code or "upstream_stream_interrupted"
        if self.chat:  # the chat framing: an error object where a chunk would be
            return chat_error_chunk(code, message)
        seq = (self.tap.last_sequence or 0) + 1
        return stream_error_event(code, message, seq)


class _Direct:
    """What a pump hands a stream relay: bytes written at once unless there is work
    (then held, the upstream paused, the relay's task woken), and the end."""

    __slots__ = (
        "_has_work",
        "_put",
        "_relay",
        "_started",
        "_tap",
        "_writer",
        "done",
        "error",
        "held",
        "wake",
    )

    def __init__(self, relay: StreamRelay, writer: BodyWriter, wake: asyncio.Future[None]) -> None:
        self._relay = relay
        self._tap = relay.tap
        self._has_work = relay.answer.has_work
        self._writer = writer
        self._put = writer.write
        self._started = False  # something was written (the first write times ttfb)
        self.wake = wake
        self.held: list[bytes] = []
        self.done = False
        self.error: BaseException | None = None

    def data(self, chunk: bytes) -> bool:  # the hot path: one call per upstream read
        self._tap.feed(chunk)
        if self.held or self._has_work():
            self.held.append(chunk)
            self._wake()
            return False
        if self._put(chunk) if self._started else self.write(chunk):
            return True
        self._wake()  # the client is slow: the relay waits for its buffer to drain
        return False

    def write(self, chunk: bytes) -> bool:
        more = self._put(chunk)
        if not self._started:
            self._started = True
            ex = self._relay.ex
            if ex.ttfb_seconds is None:
                ex.ttfb_seconds = time.perf_counter() - ex.started
        return more

    def ended(self, error: BaseException | None) -> None:
        self.done = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        if not self.wake.done():
            self.wake.set_result(None)
