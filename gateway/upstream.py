"""The shared upstream HTTP client, header hygiene, and transport-error mapping."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import httpx

from .config import UpstreamConfig
from .errors import GatewayError, ServiceUnavailable, UpstreamTimeout, UpstreamUnavailable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never sent upstream: the client's credentials, and what httpx recomputes.
_DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "api-key",
    "authorization",
    "cookie",
    "accept-encoding",
    "x-request-id",
    "x-ms-client-request-id",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
}
# Never passed back: framing the server redoes, and the shared deployment's
# rate-limit state, which would expose other tenants' consumption.
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "set-cookie", "server", "date", "x-request-id"}
_RATELIMIT = "x-ratelimit-"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class UpstreamClient:
    """One pooled httpx transport for the process, used directly.

    The gateway needs none of ``httpx.AsyncClient``'s per-request extras (cookie jar,
    auth flows, redirects, event hooks), which cost more than the forwarding itself;
    it talks to the transport's ``handle_async_request`` contract instead.
    """

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.timeout = httpx.Timeout(
            connect=cfg.connect_timeout,
            read=cfg.read_timeout,
            write=cfg.write_timeout,
            pool=cfg.pool_timeout,
        ).as_dict()
        limits = httpx.Limits(
            max_connections=cfg.max_connections,
            max_keepalive_connections=cfg.max_connections,
            keepalive_expiry=60.0,
        )
        # With trust_env, the full client routes each URL through the proxies the
        # environment names (HTTPS_PROXY, NO_PROXY); otherwise the bare transport.
        self._client: httpx.AsyncClient | None = None
        self.transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        if cfg.trust_env:
            self._client = httpx.AsyncClient(limits=limits, trust_env=True)

    def build_request(
        self, method: str, url: httpx.URL, headers: list[tuple[str, str]], content: bytes | None
    ) -> httpx.Request:
        """A request carrying the configured timeouts."""
        return httpx.Request(
            method, url, headers=headers, content=content, extensions={"timeout": self.timeout}
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send; the response body is left unread (stream it, then ``aclose``)."""
        if self._client is not None:
            return await self._client.send(request, stream=True)
        response = await self.transport.handle_async_request(request)
        response.request = request
        return response

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        await self.transport.aclose()


def new_client(cfg: UpstreamConfig) -> UpstreamClient:
    """The process's upstream client."""
    return UpstreamClient(cfg)


def safe_request_id(value: str | None) -> str | None:
    """The client's request id if it is a sane token, else None."""
    return value if value and _SAFE_ID.match(value) else None


def request_headers(
    incoming: Iterable[tuple[str, str]], request_id: str, auth: tuple[str, str]
) -> list[tuple[str, str]]:
    """Headers to send upstream: the client's, minus credentials and hop-by-hop, plus ours."""
    out = [(k, v) for k, v in incoming if k not in _DROP_REQUEST]
    out.append(auth)
    out.append(("accept-encoding", "identity"))
    out.append(("x-request-id", request_id))
    out.append(("x-ms-client-request-id", request_id))
    return out


def response_headers(upstream: httpx.Headers, request_id: str) -> list[tuple[bytes, bytes]]:
    """Headers to return to the client, as raw ASGI pairs."""
    out: list[tuple[bytes, bytes]] = []
    for k, v in upstream.raw:
        name = k.lower()
        text = name.decode("latin-1")
        if text in _DROP_RESPONSE or text.startswith(_RATELIMIT):
            continue
        out.append((name, v))
    upstream_id = upstream.get("x-request-id")
    if upstream_id:
        out.append((b"x-upstream-request-id", upstream_id.encode("latin-1")))
    out.append((b"x-request-id", request_id.encode()))
    return out


def map_transport_error(exc: httpx.HTTPError, where: str) -> GatewayError:
    """Translate an httpx failure into the error the client sees."""
    if isinstance(exc, httpx.PoolTimeout):
        return ServiceUnavailable(
            "The gateway has no free upstream connection; retry shortly.",
            code="upstream_pool_exhausted",
        )
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return UpstreamUnavailable(
            f"Could not connect to the upstream resource '{where}'.", code="upstream_connect_error"
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"The upstream resource '{where}' did not answer in time.")
    return UpstreamUnavailable(
        f"The upstream resource '{where}' failed ({type(exc).__name__}).", code="upstream_error"
    )


def is_connect_failure(exc: httpx.HTTPError) -> bool:
    """Whether the request surely never reached the upstream (safe to try elsewhere)."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def header_items(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Lower-cased header pairs."""
    return [(k.lower(), v) for k, v in headers.items()]
