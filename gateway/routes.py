"""The surface: every endpoint the gateway serves, in one table.

Each row says what the handlers need to know about an endpoint: its method and path
(under the v1 prefix ``/openai/v1``, the ``?api-version=`` prefix ``/openai``, and the
legacy ``/openai/deployments/{deployment}`` prefix where Azure has one), the operation
name used in metrics and logs, how a request is routed, how its body is read, and
which stored objects its answer creates, lists or deletes. Adding an endpoint is one
row (and its tests).

Routing:
- ``model``: by the JSON body's ``model`` (on the deployments prefix, by the path's
  deployment segment, which is the logical model name);
- ``form``: by the ``model`` field of a multipart form (same rule on the deployments
  prefix);
- ``object``: by the stored object named first in the path (its tenant and resource);
- ``home``: the tenant's home resource (``tenants.NAME.files.resource``), or the
  resource of the stored objects the body names;
- ``local``: answered by the gateway itself, nothing upstream (the models a key may use).

Bodies: ``json`` (parsed, checked, ids in it checked), ``form`` (multipart, read whole,
only its ``model`` field rewritten), ``upload`` (streamed as sent; JSON bodies are read
as ``json``), ``none`` (nothing read, nothing sent).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, unquote_to_bytes

V1 = "/openai/v1"
PREVIEW = "/openai"
DEPLOYMENTS = "/openai/deployments/{deployment}"

Route = Literal["model", "form", "object", "home", "local"]
Body = Literal["json", "form", "upload", "none"]
Kind = Literal["response", "file", "conversation", "vector_store", "container", "batch"]
# Whose shapes an endpoint speaks: its body checks and its stream framing (Responses
# events ending in response.completed; chat chunks ending in [DONE]; anything else,
# relayed without a terminal check).
Api = Literal["responses", "chat", "other"]

_BOTH = (V1, PREVIEW)
_ALL = (V1, PREVIEW, DEPLOYMENTS)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of the surface."""

    method: str
    path: str
    operation: str
    route: Route
    body: Body = "json"
    creates: Kind | None = None  # the answer's ``id`` is a new object of this kind
    lists: Kind | None = None  # the answer is a list, filtered to the tenant's objects
    deletes: bool = False  # a 2xx answer deletes the object named in the path
    model_optional: bool = False  # without ``model``, a referenced object picks the resource
    prefixes: tuple[str, ...] = _BOTH
    owner: Kind | None = None  # the kind of the path's first id (``object`` routes)
    api: Api = "other"


def _object(method: str, path: str, operation: str, kind: Kind, **kw: Any) -> Endpoint:
    body: Body = "json" if method == "POST" else "none"
    api: Api = "responses" if kind == "response" else "other"
    return Endpoint(method, path, operation, "object", body, owner=kind, api=api, **kw)


def _crud(base: str, name: str, kind: Kind, id_name: str, update: bool = True) -> list[Endpoint]:
    """Create, list, retrieve, (update,) delete of one kind of stored object."""
    one = f"{base}/{{{id_name}}}"
    rows = [
        Endpoint("POST", base, f"{name}.create", "home", creates=kind),
        Endpoint("GET", base, f"{name}.list", "home", "none", lists=kind),
        _object("GET", one, f"{name}.retrieve", kind),
        _object("DELETE", one, f"{name}.delete", kind, deletes=True),
    ]
    if update:
        rows.append(_object("POST", one, f"{name}.update", kind))
    return rows


def _model(path: str, operation: str, body: Body = "json", api: Api = "other") -> Endpoint:
    route: Route = "form" if body == "form" else "model"
    return Endpoint("POST", path, operation, route, body, prefixes=_ALL, api=api)


VS = "/vector_stores/{vector_store_id}"
CONV = "/conversations/{conversation_id}"
CNTR = "/containers/{container_id}"

ENDPOINTS: tuple[Endpoint, ...] = (
    # Responses
    Endpoint("POST", "/responses", "create", "model", creates="response", api="responses"),
    Endpoint(
        "POST",
        "/responses/compact",
        "compact",
        "model",
        creates="response",
        model_optional=True,
        api="responses",
    ),
    Endpoint(
        "POST",
        "/responses/input_tokens",
        "input_tokens",
        "model",
        model_optional=True,
        api="responses",
    ),
    _object("GET", "/responses/{response_id}", "retrieve", "response"),
    _object("DELETE", "/responses/{response_id}", "delete", "response", deletes=True),
    _object("POST", "/responses/{response_id}/cancel", "cancel", "response"),
    _object("GET", "/responses/{response_id}/input_items", "input_items", "response"),
    # Files
    Endpoint("POST", "/files", "files.create", "home", "upload", creates="file"),
    Endpoint("GET", "/files", "files.list", "home", "none", lists="file"),
    _object("GET", "/files/{file_id}", "files.retrieve", "file"),
    _object("DELETE", "/files/{file_id}", "files.delete", "file", deletes=True),
    _object("GET", "/files/{file_id}/content", "files.content", "file"),
    # Conversations
    *_crud("/conversations", "conversations", "conversation", "conversation_id"),
    _object("POST", CONV + "/items", "conversations.items.create", "conversation"),
    _object("GET", CONV + "/items", "conversations.items.list", "conversation"),
    _object("GET", CONV + "/items/{item_id}", "conversations.items.retrieve", "conversation"),
    _object("DELETE", CONV + "/items/{item_id}", "conversations.items.delete", "conversation"),
    # Vector stores
    *_crud("/vector_stores", "vector_stores", "vector_store", "vector_store_id"),
    _object("POST", VS + "/search", "vector_stores.search", "vector_store"),
    _object("POST", VS + "/files", "vector_stores.files.create", "vector_store"),
    _object("GET", VS + "/files", "vector_stores.files.list", "vector_store"),
    _object("GET", VS + "/files/{file_id}", "vector_stores.files.retrieve", "vector_store"),
    _object("POST", VS + "/files/{file_id}", "vector_stores.files.update", "vector_store"),
    _object("DELETE", VS + "/files/{file_id}", "vector_stores.files.delete", "vector_store"),
    _object("GET", VS + "/files/{file_id}/content", "vector_stores.files.content", "vector_store"),
    _object("POST", VS + "/file_batches", "vector_stores.file_batches.create", "vector_store"),
    _object(
        "GET",
        VS + "/file_batches/{batch_id}",
        "vector_stores.file_batches.retrieve",
        "vector_store",
    ),
    _object(
        "POST",
        VS + "/file_batches/{batch_id}/cancel",
        "vector_stores.file_batches.cancel",
        "vector_store",
    ),
    _object(
        "GET",
        VS + "/file_batches/{batch_id}/files",
        "vector_stores.file_batches.files",
        "vector_store",
    ),
    # Containers (code interpreter)
    *_crud("/containers", "containers", "container", "container_id", update=False),
    Endpoint(
        "POST", CNTR + "/files", "containers.files.create", "object", "upload", owner="container"
    ),
    _object("GET", CNTR + "/files", "containers.files.list", "container"),
    _object("GET", CNTR + "/files/{file_id}", "containers.files.retrieve", "container"),
    _object("DELETE", CNTR + "/files/{file_id}", "containers.files.delete", "container"),
    _object("GET", CNTR + "/files/{file_id}/content", "containers.files.content", "container"),
    # Batch jobs (their input file: POST /files with purpose=batch, checked line by line)
    Endpoint("POST", "/batches", "batches.create", "home", creates="batch"),
    Endpoint("GET", "/batches", "batches.list", "home", "none", lists="batch"),
    _object("GET", "/batches/{batch_id}", "batches.retrieve", "batch"),
    _object("POST", "/batches/{batch_id}/cancel", "batches.cancel", "batch"),
    # The models the key may use, answered by the gateway
    Endpoint("GET", "/models", "models.list", "local", "none"),
    Endpoint("GET", "/models/{model}", "models.retrieve", "local", "none"),
    # Model endpoints beside Responses
    _model("/chat/completions", "chat.completions", api="chat"),
    _model("/completions", "completions", api="chat"),
    _model("/embeddings", "embeddings"),
    _model("/images/generations", "images.generate"),
    _model("/images/edits", "images.edit", "form"),
    _model("/audio/transcriptions", "audio.transcriptions", "form"),
    _model("/audio/translations", "audio.translations", "form"),
    _model("/audio/speech", "audio.speech"),
)


@dataclass(frozen=True, slots=True)
class Match:
    """A request path matched to an endpoint; ``params`` decoded once from the raw path."""

    endpoint: Endpoint
    prefix: str
    params: dict[str, str]

    def upstream_path(self, deployment: str | None = None) -> str:
        """The path to send upstream: the route template filled with the (checked) params."""
        prefix = self.prefix
        if prefix == DEPLOYMENTS:
            prefix = "/openai/deployments/" + (deployment or self.params["deployment"])
        return prefix + self.endpoint.path.format_map(self.params)


Segments = tuple[str, ...]


def segments(raw_path: bytes) -> Segments:
    """The path's segments, each percent-decoded exactly once (never split again)."""
    out = []
    for part in raw_path.split(b"/"):
        if b"%" in part:
            try:
                out.append(unquote_to_bytes(part).decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd")  # matches no literal and no param grammar
        else:
            out.append(part.decode("latin-1"))
    return tuple(out)


def scope_segments(scope: Mapping[str, Any]) -> Segments:
    """The segments of an ASGI request's path as the client sent it (``raw_path``)."""
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes):
        raw = quote(scope["path"]).encode("ascii")
    return segments(raw.partition(b"?")[0])


class RouteTable:
    """Finds the endpoint of a (method, path) by its decoded segments: a dict for fixed
    paths, then templates of the same length. A parameter is one whole segment, so a
    decoded ``/`` inside one never makes another path."""

    def __init__(self, endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> None:
        self.exact: dict[tuple[str, Segments], Match] = {}
        self.patterns: dict[int, list[tuple[Segments, str, Endpoint]]] = {}
        self.paths: set[Segments] = set()
        for ep in endpoints:
            for prefix in ep.prefixes:
                if prefix == DEPLOYMENTS and ep.route not in ("model", "form"):
                    continue
                parts = tuple((prefix + ep.path).split("/"))
                if not any(p.startswith("{") for p in parts):
                    self.exact[ep.method, parts] = Match(ep, prefix, {})
                    self.paths.add(parts)
                    continue
                self.patterns.setdefault(len(parts), []).append((parts, prefix, ep))

    @staticmethod
    def _fill(template: Segments, parts: Segments) -> dict[str, str] | None:
        params: dict[str, str] = {}
        for want, got in zip(template, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params

    def match(self, method: str, parts: Segments) -> Match | None:
        """The endpoint serving ``method`` on the path of ``parts``, or None."""
        found = self.exact.get((method, parts))
        if found is not None:
            return found
        for template, prefix, ep in self.patterns.get(len(parts), ()):
            if ep.method != method:
                continue
            params = self._fill(template, parts)
            if params is not None:
                return Match(ep, prefix, params)
        return None

    def known_path(self, parts: Segments) -> bool:
        """Whether some method is served on the path (a wrong method is then a 405)."""
        return parts in self.paths or any(
            self._fill(t, parts) is not None for t, _, _ in self.patterns.get(len(parts), ())
        )


_HOW = {
    "model": "`model` in the body",
    "form": "`model` form field",
    "object": "the object in the path",
    "home": "home resource, or the objects the body names",
    "local": "answered by the gateway",
}


def markdown() -> str:
    """The endpoint table for docs/api.md, made from ``ENDPOINTS``."""
    rows = [
        "| method | path under `/openai/v1` | operation | routed by | also on | objects |",
        "|---|---|---|---|---|---|",
    ]
    for ep in ENDPOINTS:
        forms = []
        if PREVIEW in ep.prefixes:
            forms.append("`/openai…?api-version=`")
        if DEPLOYMENTS in ep.prefixes:
            forms.append("`/openai/deployments/{model}…`")
        objects = []
        if ep.creates:
            objects.append(f"creates {ep.creates}")
        if ep.lists:
            objects.append(f"lists own {ep.lists}s")
        if ep.deletes:
            objects.append("deletes")
        if ep.owner and not ep.deletes:
            objects.append(f"owned {ep.owner}")
        rows.append(
            f"| {ep.method} | `{ep.path}` | `{ep.operation}` | {_HOW[ep.route]} | "
            f"{', '.join(forms)} | {', '.join(objects)} |"
        )
    return "\n".join(rows) + "\n"
