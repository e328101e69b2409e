"""Headers between the client and Azure: what goes up besides the client's allowlisted
ones (the credential, request ids, identity encoding, our span), and what comes back
(hop-by-hop framing and the shared deployment's rate-limit state dropped)."""

from __future__ import annotations

import re
from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never passed back: framing the server redoes, and the shared deployment's
# rate-limit state, which would expose other tenants' consumption.
_DROP_RESPONSE = HOP_BY_HOP | {
    b"content-length",
    b"set-cookie",
    b"server",
    b"date",
    b"x-request-id",
}
_RATELIMIT = b"x-ratelimit-"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")


def safe_request_id(value: str | None) -> str | None:
    """The client's request id if it is a sane token, else None."""
    return value if value and _SAFE_ID.match(value) else None


def gateway_headers(
    client: list[tuple[str, str]],
    request_id: str,
    auth: tuple[str, str],
    traceparent: str | None = None,
) -> list[tuple[str, str]]:
    """Headers to send upstream: the client's allowlisted ones (``outbound``) plus ours:
    the credential, the request ids, identity encoding, and our span's traceparent."""
    out = client if traceparent is None else [h for h in client if h[0] != "traceparent"]
    out = [*out, auth, ("accept-encoding", "identity"), ("x-request-id", request_id)]
    out.append(("x-ms-client-request-id", request_id))
    if traceparent is not None:
        out.append(("traceparent", traceparent))
    return out


def response_headers(
    raw: Iterable[tuple[bytes, bytes]], request_id: str
) -> list[tuple[bytes, bytes]]:
    """Headers to return to the client, as raw ASGI pairs."""
    out: list[tuple[bytes, bytes]] = []
    upstream_id = None
    for k, v in raw:
        name = k.lower()
        if name == b"x-request-id":
            upstream_id = v
        if name in _DROP_RESPONSE or name.startswith(_RATELIMIT):
            continue
        out.append((name, v))
    if upstream_id:
        out.append((b"x-upstream-request-id", upstream_id))
    out.append((b"x-request-id", request_id.encode()))
    return out
