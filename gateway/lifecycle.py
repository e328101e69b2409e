"""The one owner of an exchange: answer, settle, observers, access line.

``Operation`` wraps every operation's handler. Whatever is raised or cancelled
anywhere below it (handler, policy, audit, upstream, relay, observer), the client gets
an OpenAI-shaped answer with its ``x-request-id`` (a generic 500 for our own bugs),
admission is settled exactly once, observers hear ``finished`` exactly once (which
writes the access line), and an unexpected traceback is logged once with the request
id. Handlers and relays only do their step and raise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ClientClosed, GatewayError, InternalError
from .exchange import Exchange, new_request_id
from .headers import safe_request_id
from .pricing import bill
from .quotas import estimate_tokens, ratelimit_headers
from .runtime import client_address
from .server import RECEIVED
from .sse import chat_error_chunk, stream_error_event
from .state import LedgerEntry

if TYPE_CHECKING:
    from .runtime import Gateway, Snapshot


log = logging.getLogger("gateway.lifecycle")


class Incoming:
    """The request as the handlers read it: straight from the ASGI scope, nothing lazy."""

    __slots__ = ("headers", "method", "path_params", "query", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path_params: dict[str, Any] = scope.get("path_params", {})
        self.query: bytes = scope.get("query_string", b"")
        # ASGI servers lower-case header names; a repeated header keeps its last value.
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

    def query_param(self, name: str) -> str | None:
        """One query parameter's value (the first if repeated)."""
        if not self.query:
            return None
        for key, value in parse_qsl(self.query.decode("latin-1"), keep_blank_values=True):
            if key == name:
                return value
        return None


Handler = Callable[[Incoming, Exchange], Awaitable[ASGIApp]]


async def shielded(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def new_exchange(incoming: Incoming, operation: str, snap: Snapshot) -> Exchange:
    """The exchange record of one request."""
    headers = incoming.headers
    scope = incoming.scope
    client = scope.get("client")
    peer = client[0] if client else None
    ex = Exchange(
        request_id=safe_request_id(headers.get("x-request-id")) or new_request_id(),
        operation=operation,
        method=incoming.method,
        client=client_address(peer, headers.get("x-forwarded-for"), snap),
        traceparent=headers.get("traceparent"),
    )
    # The clock starts when the server read the request's first byte, not when this
    # handler got its turn: a saturated worker shows in its own figures.
    received = (scope.get("extensions") or {}).get(RECEIVED)
    if isinstance(received, dict) and isinstance(received.get("at"), float):
        ex.started = received["at"]
    return ex


def error_headers(exc: GatewayError, ex: Exchange, length: int) -> list[tuple[bytes, bytes]]:
    """Headers of a gateway-made error: its own, the request id, the tenant's quota."""
    extra = {k.lower(): v for k, v in exc.headers.items()}
    if ex.admission is not None and not any(k.startswith("x-ratelimit-") for k in extra):
        extra.update(ratelimit_headers(ex.admission))
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(length).encode()),
        (b"x-request-id", ex.request_id.encode()),
        *((k.encode(), v.encode()) for k, v in extra.items()),
    ]


class _Cycle:
    """Tracks what has been sent, so the owner knows which answer is still possible."""

    __slots__ = ("ended", "ex", "send", "started", "stream")

    def __init__(self, send: Send, ex: Exchange) -> None:
        self.send = send
        self.ex = ex
        self.started = False
        self.ended = False
        self.stream = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self.ex.status = message["status"]
            for k, v in message.get("headers", ()):
                if k == b"content-type":
                    self.stream = v.startswith(b"text/event-stream")
                    break
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.ended = True
        await self.send(message)


def chunk_sender(send: Send) -> Send:
    """Where a relay sends the middle chunks of a body (``more_body`` true, after the
    start): past the owner's ``_Cycle``, which only watches the start and the end, to the
    server itself. One coroutine call less per SSE event."""
    return send.send if isinstance(send, _Cycle) else send


class Operation:
    """An ASGI app for one operation; the only place that answers, settles and finishes."""

    def __init__(self, gw: Gateway, operation: str, handler: Handler) -> None:
        self.gw = gw
        self.operation = operation
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        incoming = Incoming(scope, receive)
        ex = new_exchange(incoming, self.operation, gw.snap)
        for obs in gw.observers:
            _tell(obs.started, ex)
        cycle = _Cycle(send, ex)
        try:
            response = await self.handler(incoming, ex)
            await response(scope, receive, cycle)
        except GatewayError as exc:
            await self._fail(exc, cycle)
        except ClientDisconnect:
            await self._fail(ClientClosed("The client disconnected."), cycle)
        except Exception:
            log.exception(
                "unhandled error",
                extra={"request_id": ex.request_id, "operation": self.operation},
            )
            await self._fail(InternalError(), cycle)
        except asyncio.CancelledError:
            ex.interrupted = True
            if not cycle.started:
                ex.status = ClientClosed.status
                ex.error_code = ClientClosed.code
            raise
        finally:
            if not ex.usage and (
                (ex.interrupted and ex.stream and ex.operation == "create")
                or (ex.stream_relayed and ex.api == "chat")
            ):
                # Cut before Azure reported usage, or a chat stream without a usage chunk:
                # charged and priced by estimate.
                ex.estimated_tokens = estimate_tokens(ex.request_bytes, ex.stream_events)
            await finish(gw, ex)

    async def _fail(self, exc: GatewayError, cycle: _Cycle) -> None:
        ex = cycle.ex
        ex.error_code = exc.code
        if isinstance(exc, ClientClosed):
            ex.interrupted = True
            ex.status = ex.status or exc.status
            return
        if cycle.ended:
            return
        try:
            if not cycle.started:
                body = exc.body()
                await cycle(
                    {
                        "type": "http.response.start",
                        "status": exc.status,
                        "headers": error_headers(exc, ex, len(body)),
                    }
                )
                await cycle({"type": "http.response.body", "body": body})
            elif cycle.stream:
                ex.interrupted = True
                code = exc.code or "internal_error"
                if ex.api == "chat":
                    event = chat_error_chunk(code, exc.message)
                else:
                    event = stream_error_event(code, exc.message, None)
                await cycle({"type": "http.response.body", "body": event})
            else:
                ex.interrupted = True
                await cycle({"type": "http.response.body", "body": b""})
        except Exception as send_exc:  # the client is gone; nothing more to tell it
            log.info(
                "could not send the error answer",
                extra={"request_id": ex.request_id, "reason": type(send_exc).__name__},
            )
        if ex.status == 0:
            ex.status = exc.status


async def finish(gw: Gateway, ex: Exchange) -> None:
    """The end of an exchange, once: price it, charge and settle it (lease, tokens, money,
    ledger), then tell the observers (metrics, access line). For HTTP requests (the
    owner's ``finally``) and for each response on a WebSocket."""
    try:
        ledger = bill(ex, gw.snap.loaded.config)  # money first: budgets are charged in it
        if ex.quota_scopes or ledger:  # only then is there anything to settle
            if gw.state_is_local:
                await _settle(gw, ex, ledger)  # never suspends: nothing to shield
            else:
                await shielded(_settle(gw, ex, ledger))
    finally:
        ex.duration_seconds = time.perf_counter() - ex.started
        for obs in gw.observers:
            _tell(obs.finished, ex)


async def _settle(gw: Gateway, ex: Exchange, ledger: LedgerEntry | None) -> None:
    try:
        await gw.gate.settle(ex, ledger)
    except Exception:
        log.exception("settling the quota failed", extra={"request_id": ex.request_id})


def _tell(hook: Callable[[Exchange], None], ex: Exchange) -> None:
    try:
        hook(ex)
    except Exception:
        log.exception("observer failed", extra={"request_id": ex.request_id})
