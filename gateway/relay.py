"""Pure-ASGI responses: upstream JSON as received, SSE byte for byte, gateway errors.

Every response here closes its upstream response in a ``finally``, and tells the
observers once, when the exchange is over.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send

from .errors import GatewayError
from .exchange import Exchange
from .quotas import ratelimit_headers
from .sse import SseTap
from .upstream import map_transport_error, response_headers

if TYPE_CHECKING:
    from .runtime import Gateway

log = logging.getLogger("gateway.relay")

Binder = Callable[[str], Awaitable[None]]


async def settle(ex: Exchange, gw: Gateway) -> None:
    """Release quota leases and charge tokens; shielded, so a cancelled stream still pays."""
    with anyio.CancelScope(shield=True):
        await gw.gate.settle(ex)


def quota_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """The tenant's own ``x-ratelimit-*`` headers, when a quota applies."""
    if ex.admission is None:
        return []
    return [(k.encode(), v.encode()) for k, v in ratelimit_headers(ex.admission).items()]


def finish(ex: Exchange, gw: Gateway, status: int) -> None:
    """Close the books on one exchange and tell every observer."""
    ex.status = status
    ex.duration_seconds = time.perf_counter() - ex.started
    for obs in gw.observers:
        try:
            obs.finished(ex)
        except Exception:
            log.exception("observer failed", extra={"request_id": ex.request_id})


async def _remember(ex: Exchange, gw: Gateway, bind: Binder | None, response_id: str) -> None:
    if bind is None:
        return
    try:
        await bind(response_id)
    except Exception as exc:
        # The response exists upstream already; the client still gets it.
        log.error(
            "could not bind response to tenant",
            extra={"request_id": ex.request_id, "reason": type(exc).__name__},
        )


class ErrorResponse:
    """A gateway-made error in the OpenAI shape."""

    def __init__(self, exc: GatewayError, ex: Exchange, gw: Gateway) -> None:
        self.exc = exc
        self.ex = ex
        self.gw = gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.exc.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", self.ex.request_id.encode()),
        ]
        extra = {k.lower(): v for k, v in self.exc.headers.items()}
        if self.ex.admission is not None and not any(k.startswith("x-ratelimit-") for k in extra):
            extra.update(ratelimit_headers(self.ex.admission))
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        self.ex.error_code = self.exc.code
        try:
            await send(
                {"type": "http.response.start", "status": self.exc.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            await settle(self.ex, self.gw)
            finish(self.ex, self.gw, self.exc.status)


class _UpstreamRelay:
    """An upstream answer to relay; ``bind`` remembers a created response's id."""

    def __init__(
        self, upstream: httpx.Response, ex: Exchange, gw: Gateway, bind: Binder | None
    ) -> None:
        self.upstream = upstream
        self.ex = ex
        self.gw = gw
        self.bind = bind


class JsonRelay(_UpstreamRelay):
    """A non-streamed upstream answer, read whole and passed on unchanged."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex, gw, resp = self.ex, self.gw, self.upstream
        try:
            raw = await resp.aread()
        except httpx.HTTPError as exc:
            err = map_transport_error(exc, ex.target.resource if ex.target else "upstream")
            await ErrorResponse(err, ex, gw)(scope, receive, send)
            return
        finally:
            await resp.aclose()
        ex.upstream_seconds = time.perf_counter() - (ex.upstream_started or ex.started)
        if resp.status_code < 300:
            await self._inspect(raw)
        headers = response_headers(resp.headers, ex.request_id) + quota_headers(ex)
        headers.append((b"content-length", str(len(raw)).encode()))
        try:
            await send(
                {"type": "http.response.start", "status": resp.status_code, "headers": headers}
            )
            await send({"type": "http.response.body", "body": raw})
            ex.ttfb_seconds = time.perf_counter() - ex.started
        finally:
            await settle(ex, gw)
            finish(ex, gw, resp.status_code)

    async def _inspect(self, raw: bytes) -> None:
        ex, gw = self.ex, self.gw
        if ex.operation == "delete":
            if ex.response_id:
                await gw.state.delete_binding(ex.response_id)
            return
        if "json" not in self.upstream.headers.get("content-type", ""):
            return
        try:
            body = json.loads(raw)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if isinstance(body.get("usage"), dict):
            ex.usage = body["usage"]
        if body.get("object") == "response" and isinstance(body.get("id"), str):
            if ex.response_id is None:
                ex.response_id = body["id"]
            await _remember(ex, gw, self.bind, body["id"])
        if gw.audit.enabled and "output" in body:
            records = gw.audit.response_records(ex, body["output"])
            await gw.audit.write(ex, records, before_forward=False)


class StreamRelay(_UpstreamRelay):
    """An upstream SSE stream relayed byte for byte, each chunk sent as it arrives."""

    def __init__(
        self, upstream: httpx.Response, ex: Exchange, gw: Gateway, bind: Binder | None
    ) -> None:
        super().__init__(upstream, ex, gw, bind)
        self.tap = SseTap(self._on_event if gw.audit.enabled else None)
        ex.stream = True

    def _on_event(self, event: dict[str, Any]) -> None:
        self.ex.pending_audit += self.gw.audit.stream_records(self.ex, event)

    async def _flush_audit(self) -> None:
        records, self.ex.pending_audit = self.ex.pending_audit, []
        await self.gw.audit.write(self.ex, records, before_forward=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex, gw, resp, tap = self.ex, self.gw, self.upstream, self.tap
        headers = response_headers(resp.headers, ex.request_id) + quota_headers(ex)
        status = resp.status_code
        bound = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while True:
                        message: Message = await receive()
                        if message["type"] == "http.disconnect":
                            ex.interrupted = True
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch_disconnect)
                ex.stream_relayed = True
                for obs in gw.observers:
                    obs.stream_started(ex)
                await send({"type": "http.response.start", "status": status, "headers": headers})
                try:
                    async for chunk in resp.aiter_raw():
                        tap.feed(chunk)
                        if not bound and tap.response_id is not None:
                            bound = True
                            ex.response_id = ex.response_id or tap.response_id
                            await _remember(ex, gw, self.bind, tap.response_id)
                        if ex.pending_audit:
                            await self._flush_audit()
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        if ex.ttfb_seconds is None:
                            ex.ttfb_seconds = time.perf_counter() - ex.started
                except httpx.HTTPError as exc:
                    ex.interrupted = True
                    ex.error_code = "upstream_stream_interrupted"
                    log.warning(
                        "upstream stream broke off",
                        extra={"request_id": ex.request_id, "reason": type(exc).__name__},
                    )
                    await send({"type": "http.response.body", "body": self._error_event(exc)})
                else:
                    await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
            tap.close()
            if ex.pending_audit:
                with anyio.CancelScope(shield=True):
                    await self._flush_audit()
            ex.upstream_seconds = time.perf_counter() - (ex.upstream_started or ex.started)
            ex.stream_events = tap.events
            if tap.usage is not None:
                ex.usage = tap.usage
            elif tap.final_type is None and status < 300:
                ex.interrupted = True
            await settle(ex, gw)
            finish(ex, gw, status)

    def _error_event(self, exc: Exception) -> bytes:
        """A closing ``error`` event, so SDKs raise instead of seeing a silent end."""
        seq = (self.tap.last_sequence or 0) + 1
        event = {
            "type": "error",
            "code": "upstream_stream_interrupted",
            "message": f"The upstream stream broke off ({type(exc).__name__}).",
            "param": None,
            "sequence_number": seq,
        }
        return b"\nevent: error\ndata: " + json.dumps(event).encode() + b"\n\n"
