"""The generic handler of every endpoint: the steps of DESIGN.md, one call each.

authenticate → parse (path, query, body) → authorize (tools, MCP) → own (every id the
request names) → route → admit → audit → outbound (per target) → forward → relay.
Everything sent upstream is built from what ``parse`` produced and the later steps
checked; the client's own bytes go on only as file content inside a rebuilt form.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from starlette.types import ASGIApp

from .audit import check_tool_policy
from .batch_lines import BatchFile, check_batch_file
from .body import Form, Media, body_chunks, media, read_body, read_form, unsupported
from .errors import BadRequest, GatewayError, MethodNotAllowed, NotFound
from .exchange import Exchange
from .forward import Forwarder
from .keys import Principal
from .lifecycle import Incoming, Operation
from .objects import FREE_FORM, FREE_TEXT, ID_KEYS, Keeper, Refs, object_id, owned
from .outbound import (
    IMAGE_DEPLOYMENT_HEADER,
    Outbound,
    Query,
    form_body,
    forwarded_headers,
    json_body,
    tool_deployments,
    upstream_path,
)
from .routes import DEPLOYMENTS, Match, RouteTable, scope_segments
from .routing import Target
from .runtime import Gateway, Snapshot
from .validate import check_body, check_fields, check_headers, parse_json

# A logical model name in a path: what config accepts as a model name, never a dot segment.
_MODEL = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._:-]{1,128}$")
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
            raise NotFound(
                f"Unknown path '{ex.path}'; see the gateway's endpoint table for what it serves.",
                code="unknown_path",
            )

        return Operation(self.gw, "unknown", handler)

    async def _serve(self, request: Incoming, ex: Exchange) -> ASGIApp:
        match: Match = request.scope["route"]
        ep = match.endpoint
        ex.api = ep.api
        snap = self.gw.snap
        cfg = snap.loaded.config
        check_headers(request.scope["headers"])
        principal = await self.gw.keys.authenticate(request.scope["headers"], snap.keyring)
        ex.principal = principal
        tenant = cfg.tenants[principal.tenant]
        parsed = Parsed()
        try:
            await self._parse(request, match, ex, snap, parsed)
            body = parsed.json
            decisions: list[dict[str, Any]] = []
            if body is not None:
                decisions = check_tool_policy(principal.tenant, tenant, body.get("tools"))
            pinned, bindings = await owned(self.gw.state, principal.tenant, parsed.refs.refs)
            ex.pinned = pinned
            batch = await self._batch_file(snap, principal, tenant, ep, parsed, ex)
            if batch is not None:
                targets: tuple[Target, ...] = (batch.target._replace(deployment=""),)
            else:
                targets = self._route(snap, principal, match, parsed, ex, bindings)
            attempts = self._outbound(snap, principal, request, match, parsed, targets)
            await self.gw.gate.admit(ex, principal.tenant, tenant, ex.model or "")
            if ep.creates == "batch":
                file_id = body.get("input_file_id") if body is not None else None
                await self.gw.batches.admit(ex, tenant, bindings, file_id)
            if body is not None:
                await self._audit_request(ex, body, decisions, attempts)
            if batch is not None and batch.mcp:
                await self._audit_batch(ex, batch, attempts)
            deleted = parsed.refs.refs[0].id if ep.deletes else None
            keeper = Keeper(
                self.gw,
                ex,
                ep,
                cfg.state.response_retention_days * 86400.0,
                deleted,
                parsed.query.page_size(),
            )
            listing = (match, parsed.query) if ep.lists and request.method == "GET" else None
            client_headers = forwarded_headers(
                request.scope["headers"], cfg.upstream.forward_headers
            )
            forwarder = Forwarder(self.gw, snap, ex, request.method)
            named = bool(parsed.refs.refs)
            return await forwarder.forward(attempts, client_headers, keeper, named, listing)
        finally:
            if parsed.form is not None:
                parsed.form.close()

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
        body = (
            check_body(value)
            if ep.api == "responses" and ep.route == "model"
            else check_fields(value)
        )
        parsed.refs.body(body)
        parsed.json = body
        ex.stream = body.get("stream") is True
        prev = body.get("previous_response_id")
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
        tenant: Any,
        ep: Any,
        parsed: Parsed,
        ex: Exchange,
    ) -> BatchFile | None:
        """A ``purpose=batch`` upload: every line checked, the file rebuilt from them, and
        sent to the resource of the batch deployment its lines resolve to."""
        form = parsed.form
        if ep.operation != "files.create":
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
        checked = await check_batch_file(snap, self.gw.state, principal.tenant, tenant, files[0])
        if ex.pinned is not None and ex.pinned != checked.target.resource:
            checked.spool.close()
            raise BadRequest(
                "The objects this upload names live on another resource than the batch "
                "deployment its lines run on.",
                code="objects_on_different_resources",
            )
        files[0].replace(checked.spool, checked.size)
        ex.model = checked.model
        if self.gw.batches.metrics is not None:
            self.gw.batches.metrics.batch_uploaded(principal.tenant, checked.lines)
        return checked

    # -- route and outbound -------------------------------------------------

    def _route(
        self,
        snap: Snapshot,
        principal: Principal,
        match: Match,
        parsed: Parsed,
        ex: Exchange,
        bindings: list[Any],
    ) -> tuple[Target, ...]:
        """The targets in order: by model (allowlist, regions), or the objects' resource."""
        ep = match.endpoint
        tenant = snap.loaded.config.tenants[principal.tenant]
        model: Any = None
        if ep.route in ("model", "form"):
            if match.prefix == DEPLOYMENTS:
                model = match.params["deployment"]
            elif parsed.json is not None:
                model = parsed.json.get("model")
            elif parsed.form is not None:
                model = parsed.form.field("model")
            if not model and not (ep.model_optional and ex.pinned is not None):
                raise BadRequest(
                    "Missing required parameter: 'model' (a model name this gateway serves).",
                    code="missing_required_parameter",
                    param="model",
                )
        if model:
            ex.model = model
            return snap.router.targets(principal.tenant, tenant, model, ex.pinned)
        if ep.route == "object" or (ep.creates == "batch" and bindings):
            ex.model = bindings[0].model or None  # a batch's model: its input file's
        resource = ex.pinned or snap.router.home(principal.tenant, tenant)
        res = snap.loaded.config.resources.get(resource)
        if res is None:
            raise NotFound("The resource holding this object is no longer available.")
        return (Target(resource, res.endpoint, res.region, ""),)

    def _outbound(
        self,
        snap: Snapshot,
        principal: Principal,
        request: Incoming,
        match: Match,
        parsed: Parsed,
        targets: tuple[Target, ...],
    ) -> list[Outbound]:
        """The request for each target, every deployment name in it rewritten; targets
        that cannot serve what the request names are dropped.

        The body's ``model`` (JSON or form field), a tool's ``model``, the image-generation
        header, and on the deployments prefix the path's deployment segment.
        """
        tenant = snap.loaded.config.tenants[principal.tenant]
        router = snap.router
        image_model = request.headers.get(IMAGE_DEPLOYMENT_HEADER)
        body, form = parsed.json, parsed.form
        tools = (body.get("tools") if body is not None else None) or []
        tool_models = [(i, t["model"]) for i, t in enumerate(tools) if t.get("model") is not None]
        model_routed = bool(targets[0].deployment)
        attempts: list[Outbound] = []
        for target in targets:
            headers: list[tuple[str, str]] = []
            if image_model is not None:
                dep = router.deployment_on(
                    principal.tenant, tenant, image_model, target.resource, IMAGE_DEPLOYMENT_HEADER
                )
                if dep is None:
                    continue
                headers.append((IMAGE_DEPLOYMENT_HEADER, dep))
            out_body: Any = None
            if body is not None:
                out = dict(body)
                if model_routed and (match.prefix != DEPLOYMENTS or "model" in body):
                    out["model"] = target.deployment
                if tool_models:
                    new_tools = tool_deployments(snap, principal, tools, tool_models, target)
                    if new_tools is None:
                        continue  # this resource lacks a tool's model
                    out["tools"] = new_tools
                more, out_body = json_body(out)
                headers += more
            elif form is not None:
                overrides = {}
                if model_routed and form.field("model") is not None:
                    overrides["model"] = target.deployment
                more, out_body = form_body(form, overrides)
                headers += more
            path = upstream_path(match, parsed.query, target)
            attempts.append(Outbound(target, path, headers, out_body))
        if not attempts:
            raise BadRequest(
                "No resource serving this model also deploys the model(s) its tools or the "
                f"{IMAGE_DEPLOYMENT_HEADER} header name.",
                code="model_not_on_resource",
            )
        return attempts

    async def _audit_batch(self, ex: Exchange, batch: BatchFile, attempts: list[Outbound]) -> None:
        """The MCP content of a batch file's lines, durable before the file goes upstream
        (Azure runs those tools later, with no request of the tenant's to audit then)."""
        audit = self.gw.audit
        if not audit.enabled:
            return
        ex.target = attempts[0].target
        records = []
        for number, custom_id, content, decisions in batch.mcp:
            for rec in audit.request_records(ex, content, decisions):
                line = {"batch_line": number, "custom_id": audit.redactor.value(custom_id)}
                records.append({**rec, **line})
        ex.target = None
        await audit.write(ex, records, before_forward=True)

    async def _audit_request(
        self,
        ex: Exchange,
        body: dict[str, Any],
        decisions: list[dict[str, Any]],
        attempts: list[Outbound],
    ) -> None:
        """Make the request's MCP audit records durable before anything goes upstream."""
        audit = self.gw.audit
        if not audit.enabled:
            return
        ex.target = attempts[0].target  # the first choice; response records name the actual one
        records = audit.request_records(ex, body, decisions)
        ex.target = None
        await audit.write(ex, records, before_forward=True)
