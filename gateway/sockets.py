"""Where a WebSocket handshake goes: the Responses WebSocket mode, Realtime, or a 426
(an HTTP answer, so clients fall back to HTTP at once)."""

from __future__ import annotations

import contextlib
import logging

from starlette.types import Receive, Scope, Send

from .errors import GatewayError, UpgradeRequired
from .exchange import Exchange, new_request_id
from .lifecycle import finish
from .realtime import REALTIME_PATHS, RealtimeSocket
from .routes import PREVIEW
from .runtime import Gateway
from .websocket import SOCKET_PATHS, ResponsesSocket, credentials, deny


class _NoHandshakeLines(logging.Filter):
    """uvicorn logs each WebSocket handshake with its full query string, where a
    Realtime client may carry its key (``api-key=``): those lines are dropped (the
    gateway's own access line has the path without the query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('%s - "WebSocket %s"')


def quiet_handshake_lines() -> None:
    """Install the filter on uvicorn's logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _NoHandshakeLines) for f in logger.filters):
        logger.addFilter(_NoHandshakeLines())


class Sockets:
    """The WebSocket entry: the Responses mode where it is served, 426 everywhere else."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path in SOCKET_PATHS and not (
            SOCKET_PATHS[path] == PREVIEW and b"api-version=" not in scope.get("query_string", b"")
        ):
            await ResponsesSocket(self.gw, scope, receive, send).run()
            return
        if path in REALTIME_PATHS:
            await RealtimeSocket(self.gw, scope, receive, send).run()
            return
        await self.refuse(scope, receive, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """426 for a socket where none is served, logged as a WebSocket attempt."""
        ex = Exchange(request_id=new_request_id(), operation="websocket", method="GET")
        ex.transport = "websocket"
        ex.path = path = scope["path"][:200].encode("unicode_escape").decode("ascii")
        for obs in self.gw.observers:
            obs.started(ex)
        with contextlib.suppress(GatewayError):
            ex.principal = await self.gw.keys.authenticate(credentials(scope), self.gw.snap.keyring)
        exc = UpgradeRequired(
            f"WebSockets are not served on {path}; use HTTP (the same path and operations "
            "work over HTTP, streams as server-sent events)."
        )
        ex.status, ex.error_code = exc.status, exc.code
        try:
            await deny(scope, receive, send, exc, ex.request_id)
        finally:
            await finish(self.gw, ex)
