"""The shared upstream HTTP client (aiohttp, pooled), header hygiene, error mapping.

aiohttp is configured as a proxy's client: no decompression, no automatic headers,
no cookies, no redirects; bodies are relayed as the bytes arrive.

The request path is lean: for a request whose body is in memory (every JSON call), the
gateway takes a connection from aiohttp's connector (its pool, DNS cache, TLS and proxy
tunnels), writes the request head and body in one ``write`` and reads the answer with
aiohttp's protocol (its C parser, llhttp) and body stream. ``ClientSession.request`` is
left out there: its per-request work (header merging, URL and cookie handling, timers,
a writer task per body on Python < 3.12) cost about 60 µs of the gateway's ~400 µs. A
streamed body (a file upload) goes through ``ClientSession.request``, which frames it.
Each origin (scheme, host, port) is parsed once, and with ``trust_env`` its proxy is
looked up once, not per request. Connections are opened with one
``loop.create_connection`` (``_Connector``), and when traffic to an origin grows, a few
more are opened in the background (``upstream.preconnect``) so that a burst of new
streams does not wait for connects and TLS handshakes.

A request that fails on a keep-alive connection before any response byte (the upstream
closed it while idle) is sent once more on a fresh, unpooled connection: nothing reached
Azure, so this is safe for POSTs too.

Memory: an open stream costs one pooled connection (socket, aiohttp protocol and
its read buffer, ~30 KiB) plus the relay's own state; ``upstream.max_connections``
(default 10,000) bounds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp.client_exceptions import cert_errors, ssl_errors
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.helpers import ceil_timeout, get_env_proxy_for_url
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

from .config import UpstreamConfig
from .errors import (
    BadRequest,
    GatewayError,
    ServiceUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .pump import Pump, Receiver

_STALE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})

log = logging.getLogger("gateway.upstream")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# What a request or a body read can fail with: aiohttp's errors, a read timeout, the
# socket's own, and an answer llhttp cannot parse.
_TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientError, OSError, HttpProcessingError)
RawHeaders = tuple[tuple[bytes, bytes], ...]


class Unsendable(ValueError):
    """The request cannot be written as HTTP (the client's input, not the upstream)."""


class UpstreamError(Exception):
    """A transport failure talking to the upstream; ``connect`` when nothing was sent."""

    def __init__(self, error: GatewayError, *, connect: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.connect = connect


class UpstreamResponse:
    """An upstream answer whose body is still to be read; ``close`` exactly once."""

    __slots__ = (
        "_body",
        "_client",
        "_closed",
        "_drop",
        "_handler",
        "_payload",
        "_pump",
        "_release",
        "_site",
        "headers",
        "raw_headers",
        "status",
        "where",
    )

    def __init__(
        self,
        status: int,
        raw_headers: RawHeaders,
        headers: CIMultiDictProxy[str],
        payload: aiohttp.StreamReader,
        release: Callable[[], None],
        drop: Callable[[], None],
        client: UpstreamClient,
        where: str,
        site: _Origin,
        handler: ResponseHandler | None = None,
    ) -> None:
        self.status = status
        self.raw_headers = raw_headers
        self.headers = headers
        self._payload = payload
        self._release = release
        self._drop = drop
        self._client = client
        self._closed = False
        self._body: bytes | None = None
        self.where = where
        self._site = site
        self._handler = handler  # aiohttp's protocol on our own request path, else None
        self._pump: Pump | None = None
        site.busy += 1
        client.in_use += 1

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, never re-chunked."""
        return _Chunks(self._payload, self.where)

    def pump(self, receiver: Receiver) -> Pump | None:
        """Hand the rest of the body to ``receiver`` as it arrives (``pump.Pump``);
        None where the connection is not ours to take over (then read ``chunks``)."""
        handler = self._handler
        if handler is None or handler.transport is None or self._pump is not None:
            return None
        self._pump = Pump(
            handler, self._payload, handler.transport, receiver, self._client.read_timeout
        )
        self._pump.start()
        return self._pump

    def failure(self, exc: BaseException) -> GatewayError:
        """What a pump's error (``Receiver.ended``) means for the client."""
        return _mapped(exc, self.where)

    async def read(self) -> bytes:
        """The whole body (read once, kept for later calls)."""
        if self._body is None:
            try:
                self._body = await self._payload.read()
            except _TRANSPORT_ERRORS as exc:
                raise _mapped(exc, self.where) from exc
        return self._body

    def close(self) -> None:
        """Give the connection back (body read whole) or drop it (cut short)."""
        if self._closed:
            return
        self._closed = True
        if self._pump is not None:
            self._pump.restore()
        self._client.in_use -= 1
        self._site.busy -= 1
        if self._payload.at_eof():
            self._release()
        else:
            self._drop()


class _Chunks:
    """An async iterator over a body's chunks as they arrive (one layer over aiohttp's
    ``readany``: a relay step per SSE event is the stream's hot path)."""

    __slots__ = ("_payload", "_where")

    def __init__(self, payload: aiohttp.StreamReader, where: str) -> None:
        self._payload = payload
        self._where = where

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._payload.readany()
        except _TRANSPORT_ERRORS as exc:
            raise _mapped(exc, self._where) from exc
        if not chunk:
            raise StopAsyncIteration
        return chunk


def ssl_context(cfg: UpstreamConfig) -> ssl.SSLContext | bool:
    """Certificate verification against ``ca_file`` when set, else the system store."""
    if cfg.ca_file:
        return ssl.create_default_context(cafile=cfg.ca_file)
    return True


class _Origin:
    """What one upstream origin needs per request, worked out once.

    ``key`` is the request aiohttp's connector keys its pool (and opens connections,
    TLS and proxy tunnels) by; it is never sent. ``lean`` is False for a plain-HTTP
    origin behind a proxy, whose requests need the absolute form and the proxy's
    credentials: those go through ``ClientSession.request``.
    """

    __slots__ = ("busy", "host", "key", "lean", "warming")

    def __init__(
        self, origin: str, session: aiohttp.ClientSession, tls: ssl.SSLContext | bool, env: bool
    ) -> None:
        url = URL(origin, encoded=True)
        proxy: URL | None = None
        proxy_auth: aiohttp.BasicAuth | None = None
        if env:
            with contextlib.suppress(LookupError):
                proxy, proxy_auth = get_env_proxy_for_url(url)
        self.key = ClientRequest(
            "GET",
            url,
            loop=asyncio.get_running_loop(),
            session=session,
            ssl=tls,
            proxy=proxy,
            proxy_auth=proxy_auth,
        )
        self.host = self.key.headers["Host"]
        self.lean = proxy is None or url.scheme == "https"
        self.busy = 0  # requests in flight to this origin
        self.warming = False


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, opening connections with one ``loop.create_connection``.

    aiohttp opens a connection through aiohappyeyeballs: a Python socket, ``sock_connect``,
    then ``create_connection(sock=...)``: about 200 µs of CPU more per connection than the
    event loop's own ``create_connection`` to the already resolved address, which is what
    this does. The addresses are tried in order (what ``happy_eyeballs_delay=None`` means);
    errors are mapped as aiohttp maps them. A burst of new streams opens one upstream
    connection each, so this is most of the added time to first byte under a burst.
    """

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: list[Any],
        req: ClientRequest,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        last: OSError | None = None
        try:
            async with ceil_timeout(timeout.sock_connect, ceil_threshold=timeout.ceil_threshold):
                for family, _, proto, _, address in addr_infos:
                    try:
                        opened = self._loop.create_connection(  # type: ignore[call-overload]
                            *args, host=address[0], port=address[1], family=family, proto=proto,
                            **kwargs,
                        )  # fmt: skip
                        return await opened  # type: ignore[no-any-return]
                    except (*cert_errors, *ssl_errors):
                        raise
                    except OSError as exc:
                        if exc.errno is None and isinstance(exc, asyncio.TimeoutError):
                            raise
                        last = exc
                assert last is not None, "no address to connect to"
                raise last
        except cert_errors as exc:
            raise aiohttp.ClientConnectorCertificateError(req.connection_key, exc) from exc
        except ssl_errors as exc:
            raise aiohttp.ClientConnectorSSLError(req.connection_key, exc) from exc
        except OSError as exc:
            if exc.errno is None and isinstance(exc, asyncio.TimeoutError):
                raise
            raise client_error(req.connection_key, exc) from exc


class UpstreamClient:
    """One pooled aiohttp session for the process (plus an unpooled one for retries)."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.limit = cfg.max_connections
        self.in_use = 0
        self.read_timeout = cfg.read_timeout
        self._ssl = ssl_context(cfg)
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=cfg.pool_timeout + cfg.connect_timeout,
            sock_connect=cfg.connect_timeout,
            sock_read=cfg.read_timeout,
        )
        self._trust_env = cfg.trust_env
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self._origins: dict[tuple[str, bool], _Origin] = {}
        self._preconnect = cfg.preconnect
        self._seen: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()
        self._warmers: set[asyncio.Task[None]] = set()

    def _new_session(self, *, pooled: bool) -> aiohttp.ClientSession:
        connector = _Connector(
            limit=self.limit if pooled else 0,
            limit_per_host=0,
            ttl_dns_cache=300,
            happy_eyeballs_delay=None,  # addresses in order: no racing machinery per connect
            ssl=self._ssl,
            **({"keepalive_timeout": 60.0} if pooled else {"force_close": True}),
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=self._trust_env,
            raise_for_status=False,
        )

    def _origin(self, origin: str, pooled: bool) -> _Origin:
        found = self._origins.get((origin, pooled))
        if found is None:
            if len(self._origins) >= 1024:  # origins come from config; reloads may change them
                self._origins.clear()
            session = self._sessions(pooled)
            found = _Origin(origin, session, self._ssl, self._trust_env)
            self._origins[(origin, pooled)] = found
        return found

    def _sessions(self, pooled: bool) -> aiohttp.ClientSession:
        if pooled:
            if self._session is None:
                self._session = self._new_session(pooled=True)
            return self._session
        if self._fresh is None:
            self._fresh = self._new_session(pooled=False)
        return self._fresh

    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        where: str,
    ) -> UpstreamResponse:
        """Send a request; the body of the answer is left to read. Raises ``UpstreamError``.

        A streamed body (an async iterable) is sent once: it cannot be replayed on a
        fresh connection.
        """
        cut = url.find("/", url.find("//") + 2)
        origin, target = (url, "/") if cut < 0 else (url[:cut], url[cut:])
        try:
            return await self._attempt(method, origin, target, headers, body, where, pooled=True)
        except (*_TRANSPORT_ERRORS, ValueError) as exc:
            if not _stale(exc) or not isinstance(body, bytes | None):
                raise UpstreamError(self._map(exc, where), connect=_never_sent(exc)) from exc
        try:
            return await self._attempt(method, origin, target, headers, body, where, pooled=False)
        except (*_TRANSPORT_ERRORS, ValueError) as again:
            raise UpstreamError(self._map(again, where), connect=_never_sent(again)) from again

    async def _attempt(
        self,
        method: str,
        origin: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        where: str,
        *,
        pooled: bool,
    ) -> UpstreamResponse:
        site = self._origin(origin, pooled)
        if not site.lean or not isinstance(body, bytes | None):
            session = self._sessions(pooled)
            resp = await session.request(
                method,
                URL(origin + target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
            )
            return UpstreamResponse(
                resp.status,
                resp.raw_headers,
                resp.headers,
                resp.content,
                resp.release,
                resp.close,
                self,
                where,
                site,
            )
        lines = [f"{method} {target} HTTP/1.1\r\n", f"Host: {site.host}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif method in _BODY_METHODS:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        if head.count("\n") != len(lines) or head.count("\r") != len(lines):
            raise Unsendable("a header name or value holds a line break")
        data = head.encode("latin-1") + body if body else head.encode("latin-1")
        connector = self._sessions(pooled).connector
        assert connector is not None
        try:
            conn = await connector.connect(site.key, traces=[], timeout=self._timeout)
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to {origin}") from exc
        try:
            protocol = conn.protocol
            if protocol is None or protocol.transport is None:
                raise aiohttp.ServerDisconnectedError()
            if protocol not in self._seen:  # opened for this request: no idle one was left
                self._seen.add(protocol)
                if pooled and site.busy and self._preconnect and not site.warming:
                    self._warm(site, connector, min(self._preconnect, site.busy))
            protocol.set_response_params(
                skip_payload=method == "HEAD",
                read_until_eof=True,
                auto_decompress=False,
                read_timeout=self._timeout.sock_read,
            )
            protocol.transport.write(data)
            protocol.start_timeout()
            while True:
                message, payload = await protocol.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(
            message.code,
            message.raw_headers,
            message.headers,
            payload,
            conn.release,
            conn.close,
            self,
            where,
            site,
            protocol,
        )

    async def ws_connect(
        self, url: str, headers: list[tuple[str, str]], where: str
    ) -> aiohttp.ClientWebSocketResponse:
        """Open an upstream WebSocket (the Responses WebSocket mode, Realtime)."""
        session = self._sessions(pooled=True)
        try:
            return await session.ws_connect(
                URL(url, encoded=True),
                headers=headers,
                autoping=True,
                compress=0,
                max_msg_size=64 * 1024 * 1024,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            log.warning(
                "upstream refused a socket", extra={"resource": where, "status": exc.status}
            )
            error = UpstreamUnavailable(
                f"The upstream Azure resource refused the socket ({exc.status}).",
                code="upstream_socket_refused",
            )
            raise UpstreamError(error, connect=False) from exc
        except (*_TRANSPORT_ERRORS, ValueError) as exc:
            raise UpstreamError(self._map(exc, where), connect=_never_sent(exc)) from exc

    def _warm(self, site: _Origin, connector: aiohttp.BaseConnector, n: int) -> None:
        """Open up to ``n`` idle connections to ``site`` in the background (preconnect).

        Called when a request had to open a connection while others to the same origin
        were in flight: traffic is growing, so the next requests of the burst find a
        connection (TCP and TLS handshake done) instead of opening one on their path.
        Never takes the last free slots of the pool.
        """
        n = min(n, self.limit - self.in_use - 1)
        if n <= 0:
            return

        async def one() -> None:
            conn = await connector.connect(site.key, traces=[], timeout=self._timeout)
            if conn.protocol is not None:
                self._seen.add(conn.protocol)
            conn.release()  # idle in the pool, ready

        async def warm() -> None:
            try:
                results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    log.debug("preconnect: %d of %d failed (%r)", len(failed), n, failed[0])
            finally:
                site.warming = False

        site.warming = True
        task = asyncio.get_running_loop().create_task(warm())
        self._warmers.add(task)
        task.add_done_callback(self._warmers.discard)

    def _map(self, exc: BaseException, where: str) -> GatewayError:
        if isinstance(exc, Unsendable):
            return BadRequest(
                "The request cannot be sent upstream: a header holds a line break.",
                code="invalid_header",
            )
        if isinstance(exc, aiohttp.ConnectionTimeoutError) and self.in_use >= self.limit:
            return ServiceUnavailable(
                "The gateway has no free upstream connection; retry shortly.",
                code="upstream_pool_exhausted",
            )
        return _mapped(exc, where)

    async def aclose(self) -> None:
        for task in list(self._warmers):
            task.cancel()
        if self._warmers:
            await asyncio.gather(*self._warmers, return_exceptions=True)
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()


def _stale(exc: BaseException) -> bool:
    """A reused connection the upstream had closed: it fails before any response byte."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    if isinstance(exc, aiohttp.ClientOSError | aiohttp.ClientConnectionResetError):
        return not isinstance(exc, aiohttp.ClientConnectorError) and (
            exc.errno in _STALE_ERRNOS or isinstance(exc, aiohttp.ClientConnectionResetError)
        )
    return False


def _never_sent(exc: BaseException) -> bool:
    """Whether the request surely never reached the upstream (safe to try elsewhere)."""
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


def _mapped(exc: BaseException, where: str) -> GatewayError:
    # The messages go to tenants: they never name the resource (the log does).
    log.warning("upstream failed", extra={"resource": where, "reason": type(exc).__name__})
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable(
            "Could not connect to the upstream Azure resource.", code="upstream_connect_error"
        )
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout("The upstream Azure resource did not answer in time.")
    return UpstreamUnavailable(
        f"The upstream Azure resource failed ({type(exc).__name__}).", code="upstream_error"
    )


def new_client(cfg: UpstreamConfig) -> UpstreamClient:
    """The process's upstream client."""
    return UpstreamClient(cfg)
