"""WebSockets: the Responses API WebSocket mode, every frame through the HTTP steps.

``GET /openai/v1/responses`` (and ``/openai/responses?api-version=…``) with
``Upgrade: websocket``. The key is checked at the handshake (401 with the usual JSON
error, no upgrade) and the connection holds one concurrency slot of its tenant for its
life (429 at the handshake when none is free). Each client ``response.create`` frame is
checked like an HTTP create — strict JSON, types, tool and MCP policy (the
``require_approval`` rewrite included), ownership of every id it names, model
allowlist and regions, the request and token quotas and money budgets, MCP audit
records durable before it goes on — and is forwarded as the gateway's serialisation
with the deployment names rewritten. A refused frame gets an ``error`` frame and the
connection stays open; nothing goes upstream. The upstream socket opens at the first
``response.create`` (its model and objects choose the resource, with the gateway's own
credential); a later frame whose model is not on that resource gets
``model_not_on_connection_resource``. Server frames are relayed text-exact and in
order, read on the side: ``response.created`` binds the response to the tenant, the
terminal events settle the response's tokens, cost and ledger, and tell the observers
(metrics, one access line per response). Either side closing closes the other.

Every other WebSocket handshake is answered 426 ``websocket_not_served`` (an HTTP
answer, so clients fall back to HTTP at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
from starlette.types import Receive, Scope, Send

from .audit import check_tool_policy
from .breaker import OPEN
from .errors import BadRequest, GatewayError
from .exchange import Exchange
from .headers import gateway_headers
from .keys import Principal
from .lifecycle import finish, new_request_id
from .objects import Refs, owned
from .outbound import Query, forwarded_headers, tool_deployments
from .routes import PREVIEW, V1
from .routing import Target
from .runtime import Gateway
from .sse import FINAL_TYPES
from .upstream import UpstreamError
from .validate import check_body, dump_json, parse_json, parse_upstream

log = logging.getLogger("gateway.websocket")

SOCKET_PATHS = {V1 + "/responses": V1, PREVIEW + "/responses": PREVIEW}
INSECURE_KEY = "openai-insecure-api-key."


def _frame_error(exc: GatewayError) -> str:
    """The ``error`` frame of a refused client frame (the shape Azure uses on sockets)."""
    error = {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param}
    return dump_json({"type": "error", "error": error}).decode()


async def deny(scope: Scope, receive: Receive, send: Send, exc: GatewayError, rid: str) -> None:
    """Answer a handshake with an HTTP error (the ASGI denial response) instead of upgrading."""
    if (await receive())["type"] != "websocket.connect":
        return
    body = exc.body()
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode()),
            *((k.lower().encode(), v.encode()) for k, v in exc.headers.items()),
        ]
        await send(
            {"type": "websocket.http.response.start", "status": exc.status, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # a server without denial responses: a policy close
        await send({"type": "websocket.close", "code": 1008})


def credentials(scope: Scope) -> list[tuple[bytes, bytes]]:
    """Every key a handshake presents: headers, the ``api-key`` query parameter and the
    ``openai-insecure-api-key.KEY`` subprotocol browsers use (two different → 401)."""
    headers = list(scope["headers"])
    for name, value in Query.raw_pairs_of(scope.get("query_string", b"")):
        if name.lower() == "api-key":
            headers.append((b"api-key", value.encode("latin-1", "replace")))
    for name, value in scope["headers"]:
        if name == b"sec-websocket-protocol":
            for proto in value.decode("latin-1").split(","):
                proto = proto.strip()
                if proto.startswith(INSECURE_KEY):
                    headers.append((b"api-key", proto[len(INSECURE_KEY) :].encode("latin-1")))
    return headers


class Socket:
    """One client connection: authenticated and holding a slot before it is accepted,
    with everything it started settled when either side closes."""

    operation = "socket"
    api = "other"

    def __init__(self, gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
        self.gw = gw
        self.scope = scope
        self.receive = receive
        self.send = send
        self.snap = gw.snap
        self.conn = Exchange(request_id=new_request_id(), operation=self.operation, method="GET")
        self.conn.transport = "websocket"
        self.conn.api = self.api
        self.principal: Principal | None = None
        self.upstream: aiohttp.ClientWebSocketResponse | None = None
        self.target: Target | None = None
        self.pending: list[Exchange] = []  # responses asked for, in order, awaiting their end
        self.closed = False
        self._send_lock = asyncio.Lock()
        self.opened = self.last = time.monotonic()

    async def run(self) -> None:
        gw, conn = self.gw, self.conn
        for obs in gw.observers:
            obs.started(conn)
        try:
            try:
                creds = credentials(self.scope)
                self.principal = await gw.keys.authenticate(creds, self.snap.keyring)
                conn.principal = self.principal
                tenant = self.snap.loaded.config.tenants[self.principal.tenant]
                await self.before_accept()
                await gw.gate.admit(conn, self.principal.tenant, tenant, conn.model or "", "slot")
                await self.open_at_handshake()
            except GatewayError as exc:
                conn.status, conn.error_code = exc.status, exc.code
                await deny(self.scope, self.receive, self.send, exc, conn.request_id)
                return
            if (await self.receive())["type"] != "websocket.connect":
                return
            await self.send({"type": "websocket.accept", "subprotocol": self._subprotocol()})
            conn.status = 101
            gw.sockets.add(self)
            for obs in gw.observers:
                obs.socket_opened(conn)
            watchdog = asyncio.ensure_future(self._watch())
            try:
                await self._serve()
            finally:
                watchdog.cancel()
                gw.sockets.discard(self)
                for obs in gw.observers:
                    obs.socket_closed(conn)
        finally:
            await self._close_upstream()
            for ex in self.pending:
                ex.interrupted = True
                await finish(gw, ex)
            self.pending.clear()
            await finish(gw, conn)

    async def _watch(self) -> None:
        """Close the connection when idle, past its time limit, or draining (1001, once
        no response is under way)."""
        server = self.snap.loaded.config.server
        tick = min(0.5, server.websocket_idle_seconds / 4)
        while not self.closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self.gw.draining and not self.pending:
                await self.close(1001, "the gateway is shutting down")
            elif now - self.opened > server.websocket_max_seconds:
                await self.close(1000, "connection time limit reached; reconnect")
            elif now - self.last > server.websocket_idle_seconds:
                await self.close(1000, "idle timeout")

    async def close(self, code: int, reason: str) -> None:
        """Close both sides (from the gateway)."""
        if self.closed:
            return
        self.closed = True
        async with self._send_lock:
            with contextlib.suppress(Exception):
                await self.send({"type": "websocket.close", "code": code, "reason": reason})
        await self._close_upstream()

    async def _client_message(self) -> dict[str, Any] | None:
        """The client's next data frame (None: it left, or was closed): counted, and
        over ``server.max_body_bytes`` closed with 1009."""
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                return None
            if message["type"] != "websocket.receive":
                continue
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            size = len(data)
            self.last = time.monotonic()
            for obs in self.gw.observers:
                obs.socket_frame(self.conn, "in", size)
            if size > self.snap.loaded.config.server.max_body_bytes:
                await self.close(1009, "frame too large")
                return None
            return dict(message)

    async def before_accept(self) -> None:
        """Checks of the handshake itself (the model of a Realtime session)."""

    async def open_at_handshake(self) -> None:
        """Open the upstream socket before accepting (Realtime); else at the first frame."""

    async def _serve(self) -> None:
        """Serve the client's frames until either side closes (each kind its own)."""

    def _subprotocol(self) -> str | None:
        for name, value in self.scope["headers"]:
            if name == b"sec-websocket-protocol":
                offered = [p.strip() for p in value.decode("latin-1").split(",")]
                if "realtime" in offered:
                    return "realtime"
        return None

    async def _connect(self, target: Target, path: str, query: str) -> None:
        """Open the upstream socket to ``target`` with the gateway's own credential."""
        gw = self.gw
        auth = await gw.auth_header(self.snap, target.resource)
        url = target.endpoint.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        extra = self.snap.loaded.config.upstream.forward_headers
        client = forwarded_headers(self.scope["headers"], extra)
        headers = gateway_headers(client, self.conn.request_id, auth)
        try:
            self.upstream = await gw.http.ws_connect(url + path + query, headers, target.resource)
        except UpstreamError as exc:
            raise exc.error from exc
        self.target = target
        self.conn.target = target

    async def _send_text(self, text: str) -> None:
        async with self._send_lock:
            with contextlib.suppress(Exception):
                await self.send({"type": "websocket.send", "text": text})

    async def _close_upstream(self) -> None:
        if self.upstream is not None and not self.upstream.closed:
            with contextlib.suppress(Exception):
                await self.upstream.close()

    async def _relay(self) -> None:
        """Upstream frames to the client, unchanged and in order, read on the side."""
        assert self.upstream is not None
        code = 1000
        try:
            async for msg in self.upstream:
                self.last = time.monotonic()
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    for obs in self.gw.observers:
                        obs.socket_frame(self.conn, "out", len(msg.data))
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._seen(msg.data)
                    await self._send_text(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    async with self._send_lock:
                        await self.send({"type": "websocket.send", "bytes": msg.data})
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    code = 1011
                    break
            else:
                code = self.upstream.close_code or 1000
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("socket relay failed", extra={"request_id": self.conn.request_id})
            code = 1011
        if not self.closed:
            if self.pending or code != 1000:
                error = GatewayError(
                    "The upstream socket closed before the response ended."
                    if self.pending
                    else "The upstream socket closed.",
                    code="upstream_socket_closed",
                )
                await self._send_text(_frame_error(error))
            with contextlib.suppress(Exception):
                await self.send({"type": "websocket.close", "code": 1011 if code >= 1002 else 1000})

    async def _seen(self, text: str) -> None:
        """What a server frame tells the gateway (each kind of socket reads its own)."""

    async def _ended(self, ex: Exchange, response: Any, ok: bool) -> None:
        """A response ended: usage, MCP records, then settle it and tell the observers."""
        if isinstance(response, dict):
            usage = response.get("usage")
            if isinstance(usage, dict):
                ex.usage = usage
            if self.gw.audit.enabled and isinstance(response.get("output"), list):
                records = self.gw.audit.response_records(ex, response["output"])
                await self.gw.audit.write(ex, records, before_forward=False)
        ex.status = 200 if ok else 400
        ex.upstream_status = 200
        ex.upstream_seconds = time.perf_counter() - (ex.upstream_started or ex.started)
        await finish(self.gw, ex)

    def _new_response(self, model: str | None) -> Exchange:
        ex = Exchange(request_id=new_request_id(), operation="create", method="WS")
        ex.transport, ex.api, ex.stream = "websocket", self.api, True
        ex.principal, ex.model, ex.target = self.principal, model, self.target
        return ex


class ResponsesSocket(Socket):
    """One client connection in the Responses WebSocket mode."""

    operation = "responses.socket"
    api = "responses"

    async def _serve(self) -> None:
        reader: asyncio.Task[None] | None = None
        try:
            while True:
                message = await self._client_message()
                if message is None:
                    return
                text = message.get("text")
                if text is None:
                    await self._send_text(
                        _frame_error(BadRequest("Send JSON text frames.", code="invalid_frame"))
                    )
                    continue
                self.conn.request_bytes += len(text)
                try:
                    out = await self._check(text)
                except GatewayError as exc:
                    await self._send_text(_frame_error(exc))
                    continue
                if out is None:
                    continue
                assert self.upstream is not None
                if reader is None:
                    reader = asyncio.ensure_future(self._relay())
                await self.upstream.send_str(out)
                if reader.done():
                    return  # the upstream went away
        finally:
            self.closed = True
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def _check(self, text: str) -> str | None:
        """A client frame, checked; the frame to send upstream (None: nothing to send)."""
        gw, snap = self.gw, self.snap
        principal = self.principal
        assert principal is not None
        cfg = snap.loaded.config
        frame = parse_json(text.encode(), cfg.server.max_json_depth)
        if not isinstance(frame, dict) or frame.get("type") != "response.create":
            raise BadRequest(
                "This socket takes 'response.create' frames.", code="unknown_event", param="type"
            )
        body = {k: v for k, v in frame.items() if k not in ("type", "stream")}
        body = check_body(body)
        tenant = cfg.tenants[principal.tenant]
        decisions = check_tool_policy(principal.tenant, tenant, body.get("tools"))
        refs = Refs().body(body)
        ex = self._new_response(None)
        ex.request_bytes = len(text)
        pinned, _ = await owned(gw.state, principal.tenant, refs)
        ex.pinned = pinned
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest(
                "Missing required parameter: 'model'.",
                code="missing_required_parameter",
                param="model",
            )
        ex.model = model
        targets = snap.router.targets(principal.tenant, tenant, model, pinned)
        if self.target is not None:
            targets = tuple(t for t in targets if t.resource == self.target.resource)
            if not targets:
                raise BadRequest(
                    f"Model '{model}' is not served on the resource this connection uses; "
                    "open another connection for it.",
                    code="model_not_on_connection_resource",
                    param="model",
                )
        # Each target that can serve the frame, with the frame as it would go there.
        tools = body.get("tools") or []
        tool_models = [(i, t["model"]) for i, t in enumerate(tools) if t.get("model") is not None]
        payloads: list[tuple[Target, dict[str, Any]]] = []
        for target in targets:
            if self.upstream is None and gw.breakers.state(target.key) == OPEN:
                continue
            out = dict(body, model=target.deployment)
            if tool_models:
                mapped = tool_deployments(snap, principal, tools, tool_models, target)
                if mapped is None:
                    continue
                out["tools"] = mapped
            payloads.append((target, out))
        if not payloads:
            raise BadRequest(
                "No resource serving this model (and not skipped for failing) also deploys "
                "the models its tools name.",
                code="model_not_on_resource",
            )
        ex.target = payloads[0][0]
        await gw.gate.admit(ex, principal.tenant, tenant, model, part="rate")
        try:
            if gw.audit.enabled:
                records = gw.audit.request_records(ex, body, decisions)
                await gw.audit.write(ex, records, before_forward=True)
            chosen = payloads[0]
            if self.upstream is None:
                chosen = await self._open_first(payloads)
            ex.target = chosen[0]
        except BaseException:
            await finish(gw, ex)  # gives the admission back
            raise
        for obs in gw.observers:
            obs.started(ex)
        ex.upstream_started = time.perf_counter()
        self.pending.append(ex)
        return dump_json({"type": "response.create", **chosen[1]}).decode()

    async def _open_first(
        self, payloads: list[tuple[Target, dict[str, Any]]]
    ) -> tuple[Target, dict[str, Any]]:
        """Open the upstream socket on the first target that answers (in priority order;
        a connect failure is a breaker failure and moves on, as for HTTP)."""
        breakers = self.gw.breakers
        for n, (target, out) in enumerate(payloads):
            try:
                await self._open(target)
            except GatewayError:
                breakers.failure(target.key, None, None)
                if n == len(payloads) - 1:
                    raise
                continue
            breakers.success(target.key)
            return target, out
        raise AssertionError("no payloads")

    async def _open(self, target: Target) -> None:
        prefix = SOCKET_PATHS[self.scope["path"]]
        query = Query(self.scope.get("query_string", b"")).encoded()
        await self._connect(target, prefix + "/responses", query)
        self.conn.model = None

    async def _seen(self, text: str) -> None:
        """What a server frame tells the gateway: the response's id, its end and usage."""
        if not self.pending:
            return
        event = parse_upstream(text.encode())
        if not isinstance(event, dict):
            return
        etype = event.get("type")
        ex = self.pending[0]
        response = event.get("response")
        if etype == "response.created" and isinstance(response, dict):
            rid = response.get("id")
            if isinstance(rid, str) and ex.response_id is None:
                await self._bind(ex, rid)
            if ex.ttfb_seconds is None:
                ex.ttfb_seconds = time.perf_counter() - ex.started
        elif etype in FINAL_TYPES or etype == "error":
            self.pending.pop(0)
            await self._ended(ex, response, etype != "error")
        ex.stream_events += 1

    async def _bind(self, ex: Exchange, rid: str) -> None:
        from .state import Binding

        ex.response_id = rid
        assert ex.principal is not None and ex.target is not None
        ttl = self.snap.loaded.config.state.response_retention_days * 86400.0
        binding = Binding(ex.principal.tenant, ex.target.resource, ex.model or "", "response")
        try:
            await self.gw.state.bind_response(rid, binding, ttl)
        except Exception as exc:
            log.error(
                "could not bind a response to its tenant",
                extra={"request_id": ex.request_id, "reason": type(exc).__name__},
            )
