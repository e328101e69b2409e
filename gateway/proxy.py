"""The HTTP transport: the generic handler of every endpoint in the route table.

authenticate → parse the envelope (path, query, JSON or form body) → the rulebook
(``checks.check``: types, ids, tools, ownership, route, per-target plans) → a
``purpose=batch`` upload's lines through the rulebook too → admit and audit
(``checks.commit``) → the upstream request per target → forward → relay (the response
hook hears the answer). Everything sent upstream is built from what was parsed and
checked; the client's own bytes go on only as file content inside a rebuilt form.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp

from . import catalog
from .batch_lines import BatchFile, check_batch_file
from .body import Form, Media, body_chunks, media, read_body, read_form, unsupported
from .checks import IMAGE_DEPLOYMENT_HEADER, Checked, Plan, Request, check, commit, tenant_of
from .errors import BadRequest, GatewayError, MethodNotAllowed, NotFound
from .exchange import Exchange
from .forward import Forwarder
from .keys import Principal
from .lifecycle import Incoming, Operation
from .objects import FREE_FORM, FREE_TEXT, ID_KEYS, Keeper, Refs, object_id
from .outbound import Outbound, Query, form_body, forwarded_headers, upstream_path
from .routes import DEPLOYMENTS, V1, Match, RouteTable, scope_segments
from .runtime import Gateway, Snapshot
from .validate import check_headers, dump_json, parse_json

# A logical model name in a path: what config accepts as a model name, never a dot segment.
_MODEL = re.compile(r"^(?!\.\.?\Z)[A-Za-z0-9._:-]{1,128}\Z")
# Form fields the gateway reads: each may come once.
FORM_READS = frozenset({"model", "purpose", "file_id"})
OWNER_PARAM = {
    "response": "response_id",
    "file": "file_id",
    "conversation": "conversation_id",
    "vector_store": "vector_store_id",
    "container": "container_id",
    "batch": "batch_id",
}


class Parsed:
    """The request as the gateway parsed it: the only source of what goes upstream."""

    __slots__ = ("form", "json", "query", "refs")

    def __init__(self) -> None:
        self.query = Query(b"")
        self.refs = Refs()
        self.json: dict[str, Any] | None = None
        self.form: Form | None = None


class Proxy:
    """The one generic handler of every endpoint in the route table."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def endpoint(self, operation: str) -> Operation:
        """An ASGI endpoint for ``operation``, owned by the lifecycle."""
        return Operation(self.gw, operation, self._serve)

    def unknown(self, table: RouteTable) -> Operation:
        """The endpoint of every path the table does not serve: 404 (or 405), logged."""

        async def handler(request: Incoming, ex: Exchange) -> ASGIApp:
            path = request.scope["path"]
            ex.path = path[:200].encode("unicode_escape").decode("ascii")
            # The answer is the same either way; the tenant is only for the log.
            with contextlib.suppress(GatewayError):
                ex.principal = await self.gw.keys.authenticate(
                    request.scope["headers"], self.gw.snap.keyring
                )
            if table.known_path(scope_segments(request.scope)):
                raise MethodNotAllowed(f"Method {request.method} is not allowed on {ex.path}.")
            if path.startswith("/v1/") or path == "/v1":
                raise NotFound(
                    f"Unknown path '{ex.path}': this gateway serves the OpenAI API under "
                    "/openai/v1, as Azure does; set the client's base URL to "
                    "https://<gateway host>/openai/v1/ (or use the AzureOpenAI client).",
                    code="unknown_path",
                )
            raise NotFound(
                f"Unknown path '{ex.path}'; see the gateway's endpoint table for what it serves.",
                code="unknown_path",
            )

        return Operation(self.gw, "unknown", handler)

    async def _serve(self, request: Incoming, ex: Exchange) -> ASGIApp:
        match: Match = request.scope["route"]
        ep = match.endpoint
        ex.api = ep.api
        gw, snap = self.gw, self.gw.snap
        cfg = snap.loaded.config
        check_headers(request.scope["headers"])
        principal = await gw.keys.authenticate(request.scope["headers"], snap.keyring)
        ex.principal = principal
        if ep.route == "local":
            return self._local(request, match, ex, principal)
        parsed = Parsed()
        try:
            await self._parse(request, match, ex, snap, parsed)
            checked = await check(gw, snap, principal, self._request(request, match, parsed))
            ex.pinned = checked.pinned
            batch = await self._batch_file(snap, principal, checked, parsed, ex)
            attempts = self._outbound(match, parsed, checked, batch)
            lines = None
            if batch and (batch.mcp or batch.verdicts):
                lines = lambda ex: self._batch_records(ex, batch)  # noqa: E731
            await commit(gw, ex, checked, "all", lines)
            deleted = parsed.refs.refs[0].id if ep.deletes else None
            keeper = Keeper(
                gw,
                ex,
                ep.creates,
                ep.lists,
                cfg.state.response_retention_days * 86400.0,
                deleted,
                parsed.query.page_size(),
            )
            listing = (match, parsed.query) if ep.lists and request.method == "GET" else None
            client_headers = forwarded_headers(
                request.scope["headers"], cfg.upstream.forward_headers
            )
            forwarder = Forwarder(gw, snap, ex, request.method)
            named = bool(parsed.refs.refs)
            return await forwarder.forward(attempts, client_headers, keeper, named, listing)
        finally:
            if parsed.form is not None:
                parsed.form.close()

    def _local(
        self, request: Incoming, match: Match, ex: Exchange, principal: Principal
    ) -> ASGIApp:
        """An endpoint the gateway answers itself (the models the key may use)."""
        _api_version(match, Query(request.query))
        snap = self.gw.snap
        tenant = tenant_of(snap, principal)
        created = int(snap.loaded.loaded_at)
        if "model" in match.params:
            name = match.params["model"]
            if not _MODEL.match(name):
                raise NotFound(f"Unknown model '{name[:64]}'.", code="model_not_found")
            body: Any = catalog.model(snap.loaded.config, tenant, created, name)
            ex.model = name
        else:
            body = catalog.listing(snap.loaded.config, tenant, created)
        headers = {"x-request-id": ex.request_id}
        return Response(dump_json(body), 200, headers, "application/json")

    @staticmethod
    def _request(request: Incoming, match: Match, parsed: Parsed) -> Request:
        """The request as the rulebook reads it."""
        ep = match.endpoint
        model: str | None = None
        if match.prefix == DEPLOYMENTS:
            model = match.params["deployment"]
        elif parsed.form is not None and ep.route == "form":
            model = parsed.form.field("model")
        return Request(
            api="responses" if ep.api == "responses" and ep.route == "model" else ep.api,
            body=parsed.json,
            refs=parsed.refs,
            route="model" if ep.route in ("model", "form") else ep.route,
            model=model,
            model_optional=ep.model_optional,
            image_model=request.headers.get(IMAGE_DEPLOYMENT_HEADER),
            operation=ep.operation,
        )

    # -- parse ---------------------------------------------------------------

    async def _parse(
        self, request: Incoming, match: Match, ex: Exchange, snap: Snapshot, parsed: Parsed
    ) -> None:
        """Path parameters, query and body, parsed strictly; every id they name."""
        ep = match.endpoint
        refs = parsed.refs
        for name, value in match.params.items():
            if name == "deployment":
                if not _MODEL.match(value):
                    raise NotFound(f"Unknown model '{value[:64]}'.", code="model_not_found")
                continue
            kind: str | None = None
            if ep.owner is not None and name == OWNER_PARAM[ep.owner]:
                kind = ep.owner
            elif name == "file_id":  # a file in a vector store; a container's own file
                kind = "container_file" if ep.owner == "container" else "file"
            oid = object_id(value, kind or name.removesuffix("_id"), name)
            if name == "container_id":
                refs.parent_container = oid
            if kind is not None:
                refs.named(oid, kind, name)
            else:
                refs.text(oid, name)  # item and batch ids live inside their parent
        if ep.owner == "response":
            ex.response_id = match.params[OWNER_PARAM["response"]]
        query = parsed.query = Query(request.query)
        _api_version(match, query)
        for name, value in query.pairs:
            if name in ID_KEYS:
                refs.named(value, ID_KEYS[name], name)
            else:
                refs.tokens(value, name)
        if ep.operation == "retrieve":
            ex.stream = query.get("stream") == "true"
        if ep.body == "none" or request.method != "POST":
            return
        content_type = request.headers.get("content-type")
        body_type = media(content_type)
        if ep.body == "json" or (ep.body == "upload" and body_type.kind in ("json", "none")):
            if body_type.kind not in ("json", "none"):
                raise unsupported(content_type, "application/json")
            await self._json(request, match, parsed, ex, snap)
        else:
            if body_type.kind != "form":
                wants = "multipart/form-data" + (" or application/json" if ep.owner else "")
                raise unsupported(content_type, wants)
            await self._form(request, body_type, parsed, ex, snap)

    async def _json(
        self, request: Incoming, match: Match, parsed: Parsed, ex: Exchange, snap: Snapshot
    ) -> None:
        server = snap.loaded.config.server
        data = await read_body(
            request.receive,
            server.max_body_bytes,
            server.body_timeout_seconds,
            request.headers.get("content-length"),
        )
        ex.request_bytes = len(data)
        ep = match.endpoint
        if not data.strip():
            if ep.route == "model" and match.prefix != DEPLOYMENTS:
                raise BadRequest("Request body is empty; send a JSON object.", code="invalid_json")
            return
        value = parse_json(data, server.max_json_depth)
        if not isinstance(value, dict):
            raise BadRequest("Request body must be a JSON object.", code="invalid_json")
        parsed.json = value  # checked by the rulebook
        ex.stream = value.get("stream") is True
        prev = value.get("previous_response_id")
        if isinstance(prev, str):
            ex.previous_response_id = prev

    async def _form(
        self, request: Incoming, kind: Media, parsed: Parsed, ex: Exchange, snap: Snapshot
    ) -> None:
        server = snap.loaded.config.server
        upload = request.scope["route"].endpoint.body == "upload"
        limit = server.max_upload_bytes if upload else server.max_body_bytes
        chunks = body_chunks(
            request.receive,
            limit,
            server.body_timeout_seconds,
            request.headers.get("content-length"),
        )
        assert kind.boundary is not None
        form = await read_form(chunks, kind.boundary, FORM_READS, limit)
        parsed.form = form
        ex.request_bytes = sum(p.size for p in form.parts)
        for name, value in form.fields():
            if name in ID_KEYS:
                parsed.refs.named(value, ID_KEYS[name], name)
            elif name not in FREE_TEXT and name not in FREE_FORM:
                parsed.refs.tokens(value, name)

    async def _batch_file(
        self,
        snap: Snapshot,
        principal: Principal,
        checked: Checked,
        parsed: Parsed,
        ex: Exchange,
    ) -> BatchFile | None:
        """A ``purpose=batch`` upload: every line through the rulebook, the file rebuilt
        from them, and sent to the resource of the batch deployment its lines resolve to."""
        form = parsed.form
        if checked.operation != "files.create":
            return None
        if form is None:
            named = parsed.json.get("purpose") if parsed.json is not None else None
            if isinstance(named, str) and named.strip().lower() == "batch":
                raise BadRequest(  # only a form's file is checked line by line
                    "Upload a batch file as multipart/form-data (purpose=batch, file=...).",
                    code="invalid_form",
                    param="purpose",
                )
            return None
        purpose = form.field("purpose")
        if purpose is not None and purpose != "batch" and purpose.strip().lower() == "batch":
            raise BadRequest(
                f"purpose '{purpose[:20]}' is not 'batch'; send purpose=batch exactly.",
                code="invalid_value",
                param="purpose",
            )
        if purpose != "batch":
            return None
        files = [p for p in form.parts if p.spool is not None]
        if len(files) != 1 or files[0].name != "file":
            raise BadRequest(
                "A batch upload has exactly one file part, named 'file'.",
                code="invalid_form",
                param="file",
            )
        checked_file = await check_batch_file(self.gw, snap, principal, files[0])
        if ex.pinned is not None and ex.pinned != checked_file.target.resource:
            checked_file.spool.close()
            raise BadRequest(
                "The objects this upload names live on another resource than the batch "
                "deployment its lines run on.",
                code="objects_on_different_resources",
            )
        files[0].replace(checked_file.spool, checked_file.size)
        ex.model = checked_file.model
        if self.gw.batches.metrics is not None:
            self.gw.batches.metrics.batch_uploaded(principal.tenant, checked_file.lines)
        return checked_file

    # -- outbound -----------------------------------------------------------

    @staticmethod
    def _outbound(
        match: Match, parsed: Parsed, checked: Checked, batch: BatchFile | None
    ) -> list[Outbound]:
        """The upstream request for each target the rulebook planned (a batch upload: the
        batch deployment's resource), its body as the plan rendered it."""
        plans = checked.plans
        if batch is not None:
            plans = [Plan(batch.target._replace(deployment=""), None, [])]
        attempts: list[Outbound] = []
        form = parsed.form
        for plan in plans:
            target = plan.target
            headers = list(plan.headers)
            out_body: Any = None
            if plan.payload is not None:
                headers.append(("content-type", "application/json"))
                out_body = plan.payload
            elif form is not None:
                overrides = {}
                if target.deployment and form.field("model") is not None:
                    overrides["model"] = target.deployment
                more, out_body = form_body(form, overrides)
                headers += more
            attempts.append(
                Outbound(target, upstream_path(match, parsed.query, target), headers, out_body)
            )
        return attempts

    def _batch_records(self, ex: Exchange, batch: BatchFile) -> list[dict[str, Any]]:
        """The MCP content of a batch file's lines, each record naming its line (Azure
        runs those tools later, with no request of the tenant's to audit then)."""
        audit = self.gw.audit
        records = []
        for number, custom_id, line in batch.mcp:
            tools, items = line.refs.tools, line.refs.mcp_items
            for rec in audit.request_records(ex, tools, items, line.decisions):
                extra = {"batch_line": number, "custom_id": audit.redactor.value(custom_id)}
                records.append({**rec, **extra})
        for number, custom_id, verdicts in batch.verdicts:
            extra = {"batch_line": number, "custom_id": audit.redactor.value(custom_id)}
            base = audit.base(ex, "guardrail.verdict")
            records += [{**base, **v, **extra} for v in verdicts]
        return records


def _api_version(match: Match, query: Query) -> None:
    """The ``/openai/…`` and ``/openai/deployments/…`` forms need ``api-version`` (Azure
    answers a bare 404 without it): 400 here, before anything goes upstream."""
    if match.prefix != V1 and not query.get("api-version"):
        raise BadRequest(
            "This path form needs the api-version query parameter (like "
            "?api-version=2025-04-01-preview), or use the /openai/v1 form without one.",
            code="missing_api_version",
            param="api-version",
        )
