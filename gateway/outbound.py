"""The upstream request, built from the checked request (never the client's bytes).

- Path: the route template filled with the parameters decoded once from the raw path,
  each matching the id grammar (``routes.Match.upstream_path``); on the deployments
  prefix, the target's deployment.
- Query: rebuilt from the parsed parameters (``Query``): a parameter given twice is
  refused unless its name ends in ``[]``; the client's ``api-key`` never goes on.
- Headers: only those in ``FORWARDED`` (and ``upstream.forward_headers``), minus any
  the client names in ``Connection``; the gateway sets credentials, content type,
  request ids and encoding itself.
- Body: the gateway's serialisation of the parsed JSON, or the form rebuilt from its
  parsed parts, with every deployment name rewritten for the target.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl, quote, urlencode

from .body import Form, Upstream
from .errors import BadRequest
from .routes import Match
from .routing import Target
from .validate import dump_json

if TYPE_CHECKING:
    from .keys import Principal
    from .runtime import Snapshot

# Request headers Azure and the SDKs use; everything else the client sends is dropped.
FORWARDED = frozenset(
    {
        b"accept",
        b"accept-language",
        b"user-agent",
        b"openai-beta",
        b"idempotency-key",
        b"traceparent",
        b"tracestate",
        b"originator",
        b"session-id",
        b"session_id",
        b"x-client-request-id",
    }
)
FORWARDED_PREFIXES = (b"x-stainless-", b"x-codex-")
IMAGE_DEPLOYMENT_HEADER = "x-ms-oai-image-generation-deployment"


class Query:
    """The parsed query string: ``pairs`` in order, read by name."""

    __slots__ = ("pairs",)

    def __init__(self, raw: bytes) -> None:
        try:
            pairs = parse_qsl(
                raw.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict"
            )
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(
                "The query string is not valid: percent-encode UTF-8.", code="invalid_query"
            ) from None
        seen: set[str] = set()
        kept = []
        for name, value in pairs:
            if name.lower() == "api-key":
                continue  # a credential: read by the gateway only
            if name in seen and not name.endswith("[]"):
                raise BadRequest(
                    f"Query parameter '{name}' is given more than once; give it once.",
                    code="duplicate_parameter",
                    param=name,
                )
            seen.add(name)
            kept.append((name, value))
        self.pairs = kept

    @staticmethod
    def raw_pairs_of(raw: bytes) -> list[tuple[str, str]]:
        return parse_qsl(raw.decode("latin-1"), keep_blank_values=True)

    def get(self, name: str) -> str | None:
        for key, value in self.pairs:
            if key == name:
                return value
        return None

    def page_size(self) -> int | None:
        """The ``limit`` the client asked for, when it is a sane page size."""
        value = self.get("limit")
        if value is None or not value.isdigit() or len(value) > 6 or int(value) == 0:
            return None
        return int(value)

    def encoded(self, replace: dict[str, str] | None = None) -> str:
        """The query to send upstream (``?…`` or empty), ``replace`` overriding values."""
        pairs = self.pairs
        if replace:
            pairs = [(k, v) for k, v in pairs if k not in replace] + list(replace.items())
        return "?" + urlencode(pairs, safe="[]", quote_via=quote) if pairs else ""


def forwarded_headers(
    incoming: Iterable[tuple[bytes, bytes]], extra: tuple[str, ...]
) -> list[tuple[str, str]]:
    """The client's headers that go upstream: the allowlist, minus those named in
    ``Connection`` (hop-by-hop by the client's own word)."""
    headers = list(incoming)
    hop = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    out = []
    for name, value in headers:
        if name in hop:
            continue
        if (
            name in FORWARDED
            or name.startswith(FORWARDED_PREFIXES)
            or (extra and any(fnmatchcase(name.decode("latin-1"), p) for p in extra))
        ):
            out.append((name.decode("latin-1"), value.decode("latin-1")))
    return out


class Outbound(NamedTuple):
    """One upstream request for one target."""

    target: Target
    path: str  # path and query
    headers: list[tuple[str, str]]  # set by the gateway for this target (content type…)
    body: bytes | Upstream | None


def json_body(body: dict[str, Any]) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and bytes of a JSON body as the gateway sends it."""
    return [("content-type", "application/json")], dump_json(body)


def form_body(form: Form, overrides: dict[str, str]) -> tuple[list[tuple[str, str]], Upstream]:
    """Headers and body of a form as the gateway sends it (rebuilt from its parts)."""
    ctype, length, upstream = form.encode(overrides)
    return [("content-type", ctype), ("content-length", str(length))], upstream


def upstream_path(match: Match, query: Query, target: Target) -> str:
    """The upstream path and query for ``target``."""
    deployment = target.deployment if target.deployment else None
    return match.upstream_path(deployment) + query.encoded()


def tool_deployments(
    snap: Snapshot,
    principal: Principal,
    tools: list[Any],
    tool_models: list[tuple[int, Any]],
    target: Target,
) -> list[Any] | None:
    """The tools with each tool's ``model`` mapped to its deployment on ``target``'s
    resource (None: the resource lacks one)."""
    tenant = snap.loaded.config.tenants[principal.tenant]
    new_tools = list(tools)
    for i, name in tool_models:
        dep = snap.router.deployment_on(
            principal.tenant, tenant, name, target.resource, f"tools[{i}].model"
        )
        if dep is None:
            return None
        new_tools[i] = {**new_tools[i], "model": dep}
    return new_tools
