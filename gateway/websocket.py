"""The socket transports' common part, and the Responses API WebSocket mode.

A socket is one exchange: authenticated at the handshake (401 with the usual JSON error,
no upgrade), holding one concurrency slot of its tenant for its life (429 at the
handshake when none is free), and living under the credential that opened it: every
client frame, every response the upstream starts by itself and a watchdog four times a
second re-check that key (revoked, expired, past its rotation grace, its tenant removed
by a reload → an ``error`` event ``invalid_api_key``, close 1008, the upstream closed and
the slot freed). The handshake is parsed strictly (unknown or repeated query parameters
→ 400 before the upgrade) and the upstream URL is built from what was checked, never
copied. Binary frames close the socket (1003): neither protocol defines one.

The Responses WebSocket mode (``GET /openai/v1/responses``, ``/openai/responses?api-version=…``
with ``Upgrade: websocket``): each client ``response.create`` frame is a request of the
rulebook (``checks``) like an HTTP create — refused with an ``error`` frame, the socket
staying open — and goes up as the plan rendered it. The upstream socket opens at the
first ``response.create`` (its model and objects choose the resource, breakers skip
failing ones); a later frame whose model is not on that resource gets
``model_not_on_connection_resource``. Server frames are relayed text-exact and in order;
the response hook (``answers.Answer``) binds the response id before the frame that
carries it reaches the client, audits MCP items, and settles each response at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import aiohttp
from starlette.types import Receive, Scope, Send

from .answers import Answer
from .checks import Checked, Plan, Request, check, commit, tenant_of
from .errors import BadRequest, GatewayError, Unauthenticated
from .exchange import Exchange, new_request_id
from .headers import gateway_headers
from .keys import Principal, digest_of, required_key
from .lifecycle import finish
from .objects import Keeper
from .outbound import Query, forwarded_headers
from .routes import PREVIEW, V1
from .routing import Target
from .runtime import Gateway, client_address
from .sse import FINAL_TYPES
from .upstream import UpstreamError
from .validate import dump_json, parse_json

log = logging.getLogger("gateway.websocket")

SOCKET_PATHS = {V1 + "/responses": V1, PREVIEW + "/responses": PREVIEW}
INSECURE_KEY = "openai-insecure-api-key."
_API_VERSION = re.compile(r"[A-Za-z0-9._-]{1,40}")
WATCH_SECONDS = 0.25


def frame_error(exc: GatewayError, event_id: Any = None) -> str:
    """The ``error`` frame of a refused client frame (the shape Azure uses on sockets)."""
    error = {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param}
    if isinstance(event_id, str):
        error["event_id"] = event_id  # the client event it answers, as Azure names it
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


def _subprotocols(scope: Scope) -> list[str]:
    return [
        p.strip()
        for name, value in scope["headers"]
        if name == b"sec-websocket-protocol"
        for p in value.decode("latin-1").split(",")
    ]


def credentials(scope: Scope, in_url: bool = True) -> list[tuple[bytes, bytes]]:
    """Every key a handshake presents: headers, and where ``in_url`` (Realtime's browser
    clients) the ``api-key`` query parameter and the ``openai-insecure-api-key.KEY``
    subprotocol (two different → 401). Elsewhere a key there is refused (401)."""
    headers = list(scope["headers"])
    url_keys = [v for n, v in parse_qsl(_query(scope), True) if n.lower() == "api-key"]
    proto_keys = [
        p[len(INSECURE_KEY) :] for p in _subprotocols(scope) if p.startswith(INSECURE_KEY)
    ]
    if not in_url and (url_keys or proto_keys):
        raise Unauthenticated(
            "This socket takes the gateway key in the 'api-key' or 'Authorization' header "
            "only, never in the URL or a subprotocol.",
            code="key_not_accepted_here",
        )
    headers += [(b"api-key", k.encode("latin-1", "replace")) for k in url_keys + proto_keys]
    return headers


def _query(scope: Scope) -> str:
    return bytes(scope.get("query_string", b"")).decode("latin-1")


def handshake_params(scope: Scope, allowed: frozenset[str]) -> dict[str, str]:
    """The handshake's query, strictly: percent-encoded UTF-8, each parameter known and
    given once (400 before the upgrade otherwise). ``api-key`` is left to
    ``credentials``, never kept."""
    out = dict(Query(bytes(scope.get("query_string", b""))).pairs)  # refuses repeats
    for name in out:
        if name not in allowed:
            known = ", ".join(sorted(allowed - {"api-key"})) or "none"
            raise BadRequest(
                f"Unknown query parameter '{name[:40]}' on this socket; it takes: {known}.",
                code="unknown_parameter",
                param=name[:40],
            )
    version = out.get("api-version")
    if version is not None and not _API_VERSION.fullmatch(version):
        raise BadRequest(
            "'api-version' is not a version.", code="invalid_value", param="api-version"
        )
    return out


class Socket:
    """One client connection: authenticated and holding a slot before it is accepted,
    under its credential for its life, with everything it started settled when either
    side closes."""

    operation = "socket"
    api = "other"
    keys_in_url = False  # the api-key query parameter and the browser subprotocol

    def __init__(self, gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
        self.gw = gw
        self.scope = scope
        self.receive = receive
        self.send = send
        self.snap = gw.snap
        self.conn = Exchange(request_id=new_request_id(), operation=self.operation, method="GET")
        self.conn.transport = "websocket"
        self.conn.api = self.api
        client = scope.get("client")
        xff = dict(scope["headers"]).get(b"x-forwarded-for", b"").decode("latin-1") or None
        self.conn.client = client_address(client[0] if client else None, xff, self.snap)
        self.principal: Principal | None = None
        self.digest = b""
        self.params: dict[str, str] = {}
        self.upstream: aiohttp.ClientWebSocketResponse | None = None
        self.target: Target | None = None
        self.pending: list[Answer] = []  # responses asked for, in order, awaiting their end
        self.closed = False
        self._send_lock = asyncio.Lock()
        self._serving: asyncio.Task[None] | None = None
        self.opened = self.last = time.monotonic()

    def allowed_params(self) -> frozenset[str]:
        """The query parameters this socket's handshake takes."""
        return frozenset({"api-version"})

    async def run(self) -> None:
        gw, conn = self.gw, self.conn
        for obs in gw.observers:
            obs.started(conn)
        try:
            try:
                self.params = handshake_params(self.scope, self.allowed_params())
                creds = credentials(self.scope, self.keys_in_url)
                self.principal = await gw.keys.authenticate(creds, self.snap.keyring)
                self.digest = digest_of(required_key(creds))
                conn.principal = self.principal
                tenant = tenant_of(self.snap, self.principal)
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
            self._serving = asyncio.ensure_future(self._serve())
            watchdog = asyncio.ensure_future(self._watch())
            try:
                await self._serving
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the server is stopping this connection
                # else: the watchdog ended the connection (credential, limits)
            finally:
                watchdog.cancel()
                self._serving.cancel()
                gw.sockets.discard(self)
                for obs in gw.observers:
                    obs.socket_closed(conn)
        finally:
            await self._close_upstream()
            await self.settle_all()
            await finish(gw, conn)

    async def settle_all(self) -> None:
        """The socket ended: every response still under way is settled, cut."""
        pending, self.pending = self.pending, []
        for answer in pending:
            answer.ex.interrupted = True
            await answer.settle(False)

    def recheck(self) -> None:
        """Raise 401 unless the credential that opened the socket still opens it."""
        assert self.principal is not None
        snap = self.gw.snap
        self.gw.keys.recheck(self.digest, self.principal, snap.keyring, snap.loaded.config.tenants)

    async def revoke(self, exc: GatewayError) -> None:
        """The credential is gone: tell the client, close both sides (1008), end serving."""
        if self.closed:
            return
        error = Unauthenticated(f"{exc.message} The socket is closed.", code="invalid_api_key")
        await self._send_text(frame_error(error))
        await self.close(1008, "the gateway key is no longer valid")
        if self._serving is not None and self._serving is not asyncio.current_task():
            self._serving.cancel()

    async def _watch(self) -> None:
        """Close the connection when its credential is gone, idle, past its time limit, or
        draining (1001, once no response is under way)."""
        server = self.snap.loaded.config.server
        tick = min(WATCH_SECONDS, server.websocket_idle_seconds / 4)
        while not self.closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            try:
                self.recheck()
            except GatewayError as exc:
                await self.revoke(exc)
                return
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

    async def _client_text(self) -> str | None:
        """The client's next text frame, its credential re-checked (None: it left, or was
        closed: a binary frame with 1003, one over ``server.max_body_bytes`` with 1009, a
        dead credential with 1008)."""
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                return None
            if message["type"] != "websocket.receive":
                continue
            text: str | None = message.get("text")
            data = text if text is not None else message.get("bytes") or b""
            size = len(data)
            self.last = time.monotonic()
            for obs in self.gw.observers:
                obs.socket_frame(self.conn, "in", size)
            if text is None:
                await self.close(1003, "binary frames are not part of this protocol")
                return None
            if size > self.snap.loaded.config.server.max_body_bytes:
                await self.close(1009, "frame too large")
                return None
            try:
                self.recheck()
            except GatewayError as exc:
                await self.revoke(exc)
                return None
            self.conn.request_bytes += size
            return text

    async def before_accept(self) -> None:
        """Checks of the handshake itself (the model of a Realtime session)."""

    async def open_at_handshake(self) -> None:
        """Open the upstream socket before accepting (Realtime); else at the first frame."""

    async def _serve(self) -> None:
        """Serve the client's frames until either side closes (each kind its own)."""

    def _subprotocol(self) -> str | None:
        return "realtime" if "realtime" in _subprotocols(self.scope) else None

    async def _connect(self, target: Target, path: str, query: dict[str, str]) -> None:
        """Open the upstream socket to ``target`` with the gateway's own credential; the
        URL built from the checked parameters only."""
        gw = self.gw
        auth = await gw.auth_header(self.snap, target.resource)
        url = target.endpoint.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        extra = self.snap.loaded.config.upstream.forward_headers
        client = forwarded_headers(self.scope["headers"], extra)
        headers = gateway_headers(client, self.conn.request_id, auth)
        built = "?" + urlencode(query, quote_via=quote) if query else ""
        try:
            self.upstream = await gw.http.ws_connect(url + path + built, headers, target.resource)
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
        """Upstream frames to the client, unchanged and in order, read on the side (a
        frame the hook drops — a refused response's — does not go on)."""
        assert self.upstream is not None
        code = 1000
        try:
            async for msg in self.upstream:
                self.last = time.monotonic()
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    for obs in self.gw.observers:
                        obs.socket_frame(self.conn, "out", len(msg.data))
                if msg.type == aiohttp.WSMsgType.TEXT:
                    if await self._seen(msg.data):
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
                await self._send_text(frame_error(error))
            with contextlib.suppress(Exception):
                await self.send({"type": "websocket.close", "code": 1011 if code >= 1002 else 1000})

    async def _seen(self, text: str) -> bool:
        """What a server frame tells the gateway; False: the frame does not go on."""
        return True

    def response(self, model: str | None, text_size: int = 0) -> Exchange:
        """The exchange of one response on this socket."""
        ex = Exchange(request_id=new_request_id(), operation="create", method="WS")
        ex.transport, ex.api, ex.stream, ex.client = "websocket", self.api, True, self.conn.client
        ex.principal, ex.model, ex.target = self.principal, model, self.target
        ex.request_bytes = text_size
        return ex

    async def admitted(self, ex: Exchange, checked: Checked, part: str | None) -> None:
        """Admit and audit a checked request of this socket (the exchange given back when
        that fails after admission)."""
        try:
            await commit(self.gw, ex, checked, part)
        except BaseException:
            if part is not None:
                await finish(self.gw, ex)  # gives the admission back
            raise


class ResponsesSocket(Socket):
    """One client connection in the Responses WebSocket mode."""

    operation = "responses.socket"
    api = "responses"

    async def before_accept(self) -> None:
        if SOCKET_PATHS[self.scope["path"]] == PREVIEW and "api-version" not in self.params:
            raise BadRequest(
                "The /openai/responses form needs its api-version query parameter.",
                code="missing_api_version",
                param="api-version",
            )

    async def _serve(self) -> None:
        reader: asyncio.Task[None] | None = None
        try:
            while True:
                text = await self._client_text()
                if text is None:
                    return
                try:
                    out = await self._check(text)
                except GatewayError as exc:
                    await self._send_text(frame_error(exc))
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

    async def _check(self, text: str) -> str:
        """A client frame through the rulebook: the frame to send upstream."""
        gw, snap = self.gw, self.snap
        assert self.principal is not None
        frame = parse_json(text.encode(), snap.loaded.config.server.max_json_depth)
        if not isinstance(frame, dict) or frame.get("type") != "response.create":
            raise BadRequest(
                "This socket takes 'response.create' frames.",
                code="unknown_event_type",
                param="type",
            )
        body = {k: v for k, v in frame.items() if k not in ("type", "stream")}
        request = Request(
            api="responses",
            body=body,
            resource=self.target.resource if self.target is not None else None,
            skip_open=self.upstream is None,
            operation="create",
            render=lambda b: dump_json({"type": "response.create", **b}),
        )
        checked = await check(gw, snap, self.principal, request)
        ex = self.response(checked.model, len(text))
        ex.target = checked.plans[0].target
        if isinstance(body.get("previous_response_id"), str):
            ex.previous_response_id = body["previous_response_id"]
        await self.admitted(ex, checked, "rate")
        try:
            chosen = checked.plans[0]
            if self.upstream is None:
                chosen = await self._open_first(checked.plans)
            ex.target = chosen.target
        except BaseException:
            await finish(gw, ex)
            raise
        for obs in gw.observers:
            obs.started(ex)
        ex.upstream_started = time.perf_counter()
        ttl = snap.loaded.config.state.response_retention_days * 86400.0
        self.pending.append(Answer(gw, ex, Keeper(gw, ex, "response", None, ttl)))
        assert chosen.payload is not None
        return chosen.payload.decode()

    async def _open_first(self, plans: list[Plan]) -> Plan:
        """Open the upstream socket on the first target that answers (in priority order;
        a connect failure is a breaker failure and moves on, as for HTTP)."""
        breakers = self.gw.breakers
        prefix = SOCKET_PATHS[self.scope["path"]]
        query = {k: v for k, v in self.params.items() if k == "api-version"}
        for n, plan in enumerate(plans):
            try:
                await self._connect(plan.target, prefix + "/responses", query)
            except GatewayError:
                breakers.failure(plan.target.key, None, None)
                if n == len(plans) - 1:
                    raise
                continue
            breakers.success(plan.target.key)
            self.conn.model = None
            return plan
        raise AssertionError("no plans")

    async def _seen(self, text: str) -> bool:
        """A server frame read by the hook of the response it belongs to: its id bound
        before the frame goes on, its end settled."""
        if not self.pending:
            return True
        answer = self.pending[0]
        event = answer.frame(text)
        if event is None:
            return True
        ex = answer.ex
        ex.stream_events += 1
        if ex.ttfb_seconds is None and event.get("type") == "response.created":
            ex.ttfb_seconds = time.perf_counter() - ex.started
        if answer.has_work():
            await answer.work()
        etype = event.get("type")
        if etype in FINAL_TYPES or etype == "error":
            self.pending.pop(0)
            await answer.settle(etype != "error")
        return True
