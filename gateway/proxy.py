"""The Responses surface: authenticate, authorize, route, forward, relay, remember."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Receive

from .audit import check_mcp_policy
from .breaker import OPEN, capacity_429, retry_after_seconds
from .errors import (
    BadRequest,
    ClientClosed,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
)
from .exchange import Exchange
from .forms import boundary, field_span
from .forms import field as form_field
from .forms import replace as form_replace
from .keys import Principal
from .lifecycle import Incoming, Operation
from .objects import Ref, body_refs, created_ids, object_id, owned, owned_ids
from .policy import check_tools
from .relay import JsonRelay, RawRelay, StreamRelay
from .routes import DEPLOYMENTS, Endpoint, Match, RouteTable
from .routing import Target
from .runtime import Gateway, Snapshot
from .state import Binding
from .upstream import RETRYABLE_STATUS, UpstreamError, UpstreamResponse, request_headers
from .validate import (
    check_body,
    check_fields,
    check_headers,
    dump_json,
    parse_json,
    parse_upstream,
)

log = logging.getLogger("gateway.proxy")

IMAGE_DEPLOYMENT_HEADER = "x-ms-oai-image-generation-deployment"
# A rewritten JSON body is re-serialised, so the client's content-type goes and the
# gateway sets its own; other bodies are forwarded as sent.
_DROP_REWRITTEN = frozenset({IMAGE_DEPLOYMENT_HEADER.encode(), b"content-type"})
_DROP_AS_SENT = frozenset({IMAGE_DEPLOYMENT_HEADER.encode()})
_TRACE = frozenset({b"traceparent"})
_BODY_IDLE = "the request body stopped arriving"  # the message of the idle timer's cancel


class Attempt:
    """One upstream target with the request body (and path) rewritten for it."""

    __slots__ = ("body", "headers", "path", "target")

    def __init__(
        self,
        target: Target,
        body: Body,
        headers: list[tuple[str, str]],
        path: str | None = None,
    ) -> None:
        self.target = target
        self.body = body
        self.headers = headers
        self.path = path


async def read_body(
    receive: Receive, limit: int, idle_timeout: float, declared: str | None
) -> bytes:
    """The whole request body, refused past ``limit`` bytes or ``idle_timeout`` of silence."""
    body = bytearray()
    async for chunk in body_chunks(receive, limit, idle_timeout, declared):
        body += chunk
    return bytes(body)


async def body_chunks(
    receive: Receive, limit: int, idle_timeout: float, declared: str | None
) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused past ``limit`` bytes or ``idle_timeout``."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    # The idle timer cancels this task with a message of its own (asyncio.timeout's way,
    # without its context manager per receive: this is every request's path).
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    base = task.cancelling()
    total = 0
    while True:
        timer = loop.call_later(idle_timeout, task.cancel, _BODY_IDLE)
        try:
            message = await receive()
        except asyncio.CancelledError as exc:
            if exc.args == (_BODY_IDLE,) and task.uncancel() <= base:
                raise RequestTimeout(
                    f"The request body stopped arriving for {idle_timeout:g} s; send it whole."
                ) from None
            raise
        finally:
            timer.cancel()
        if message["type"] == "http.disconnect":
            raise ClientClosed("The client disconnected while sending the body.")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class _Upload:
    """A request body streamed upstream as it arrives; remembers why it stopped early."""

    def __init__(self, request: Incoming, limit: int, idle_timeout: float, ex: Exchange) -> None:
        self.failure: GatewayError | None = None
        self._chunks = body_chunks(
            request.receive, limit, idle_timeout, request.headers.get("content-length")
        )
        self._ex = ex
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        try:
            async for chunk in self._chunks:
                self._ex.request_bytes += len(chunk)
                yield chunk
        except GatewayError as exc:
            self.failure = exc
            raise


Body = bytes | _Upload | None


class Keeper:
    """What an answer changes in the bindings: the ids it creates, the id it deletes,
    and which items of a list the tenant may see."""

    def __init__(
        self, gw: Gateway, ex: Exchange, ep: Endpoint, ttl: float, deleted: str | None
    ) -> None:
        self.gw = gw
        self.ex = ex
        self.creates = ep.creates
        self.lists = ep.lists
        self.deleted = deleted
        self.ttl = ttl
        # Reads the next upstream page of a list after a cursor (set when forwarded).
        self.next_page: Callable[[str], Awaitable[Any]] | None = None

    async def bind(self, kind: str, oid: str) -> None:
        ex = self.ex
        assert ex.principal is not None and ex.target is not None
        if kind == "response" and ex.response_id is None:
            ex.response_id = oid
        binding = Binding(ex.principal.tenant, ex.target.resource, ex.model or "", kind)
        try:
            await self.gw.state.bind_response(oid, binding, self.ttl)
        except Exception as exc:
            # The object exists upstream already; the client still gets its answer.
            log.error(
                "could not bind an object to its tenant",
                extra={"request_id": ex.request_id, "reason": type(exc).__name__, "kind": kind},
            )

    async def created(self, body: dict[str, Any]) -> None:
        """Bind what a JSON answer created."""
        for kind, oid in created_ids(self.creates, body):
            await self.bind(kind, oid)

    async def forget(self) -> None:
        """A delete succeeded: the id is gone for everyone."""
        if self.deleted is not None:
            await self.gw.state.delete_binding(self.deleted)

    async def only_mine(self, body: dict[str, Any]) -> bytes | None:
        """A list answer without the items of other tenants (None: leave it as it is).

        A page holding none of the tenant's items while more follow would end a client's
        paging (it has no cursor of its own to go on with), so the gateway reads on, up to
        ``MAX_LIST_PAGES`` pages; the cursors it returns name the tenant's items only.
        """
        if self.lists is None or not isinstance(body.get("data"), list):
            return None
        assert self.ex.principal is not None
        tenant = self.ex.principal.tenant
        changed = False
        pages = 1
        while True:
            data = [d for d in body["data"] if isinstance(d, dict)]
            ids = [d["id"] for d in data if isinstance(d.get("id"), str)]
            mine = await owned_ids(self.gw.state, tenant, ids, self.lists)
            kept = [d for d in data if d.get("id") in mine]
            changed = changed or len(kept) != len(body["data"])
            cursor = body.get("last_id") or (ids[-1] if ids else None)
            more = body.get("has_more") is True
            if kept or not more or not isinstance(cursor, str) or self.next_page is None:
                break
            if pages >= MAX_LIST_PAGES:
                log.warning(
                    "list walk stopped: no item of the tenant's in the pages read",
                    extra={"request_id": self.ex.request_id, "pages": pages},
                )
                body = dict(body, has_more=False)
                break
            page = await self.next_page(cursor)
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                break
            body, pages, changed = page, pages + 1, True
        if not changed:
            return None
        out = dict(body, data=kept)
        # The cursors name the tenant's own items only (never another tenant's id).
        for name, index in (("first_id", 0), ("last_id", -1)):
            if name in body:
                out[name] = kept[index]["id"] if kept else None
        return dump_json(out)


# How many upstream list pages a filtered list may read to find one of the tenant's items.
MAX_LIST_PAGES = 20
# Where Azure says an object it holds is not there (yet): a stale read to retry.
_STALE_CODES = frozenset({"previous_response_not_found", "not_found", "404"})
OWNER_PARAM = {
    "response": "response_id",
    "file": "file_id",
    "conversation": "conversation_id",
    "vector_store": "vector_store_id",
    "container": "container_id",
}


class Proxy:
    """The one generic handler of every endpoint in the route table."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    # -- entry points -------------------------------------------------------

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
                ex.principal = self.gw.snap.keyring.authenticate(request.headers)
            if table.known_path(path):
                raise MethodNotAllowed(
                    f"Method {request.method} is not allowed on {ex.path}.",
                )
            raise NotFound(
                f"Unknown path '{ex.path}'; see the gateway's endpoint table for what it serves.",
                code="unknown_path",
            )

        return Operation(self.gw, "unknown", handler)

    # -- the generic handler ------------------------------------------------

    async def _serve(self, request: Incoming, ex: Exchange) -> ASGIApp:
        match: Match = request.scope["route"]
        ep = match.endpoint
        ex.api = ep.api
        snap = self.gw.snap
        cfg = snap.loaded.config
        check_headers(request.scope["headers"])
        principal = snap.keyring.authenticate(request.headers)
        ex.principal = principal
        tenant = cfg.tenants[principal.tenant]
        refs: list[Ref] = []
        if ep.owner is not None:
            param = OWNER_PARAM[ep.owner]
            oid = object_id(match.params[param], ep.owner, param)
            refs.append(Ref(ep.owner, oid, param))
            if ep.owner == "response":
                ex.response_id = oid

        # The body, as the route reads it.
        kind = ep.body
        ctype = request.headers.get("content-type", "")
        if kind == "upload" and ctype.startswith("application/json"):
            kind = "json"
        body: dict[str, Any] | None = None
        raw: Body = None
        sep: bytes | None = None
        decisions: list[dict[str, Any]] = []
        if kind == "json" and request.method == "POST":
            data = await self._body(request, snap, ex)
            if data.strip():
                parsed = parse_json(data, cfg.server.max_json_depth)
                body = (
                    check_body(parsed)
                    if ep.api == "responses" and ep.route == "model"
                    else check_fields(parsed)
                )
                raw = data
                check_tools(principal.tenant, tenant, body.get("tools"))
                decisions = check_mcp_policy(principal.tenant, tenant.mcp, body.get("tools"))
                refs += body_refs(body)
                ex.stream = body.get("stream") is True
                prev = body.get("previous_response_id")
                if isinstance(prev, str):
                    ex.previous_response_id = prev
            elif ep.route == "model" and match.prefix != DEPLOYMENTS:
                raise BadRequest("Request body is empty; send a JSON object.", code="invalid_json")
        elif kind == "form":
            sep = boundary(request.headers.get("content-type"))
            raw = await self._body(request, snap, ex)
        elif kind == "upload":
            raw = _Upload(request, cfg.server.max_upload_bytes, cfg.server.body_timeout_seconds, ex)
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > cfg.server.max_upload_bytes:
                raise PayloadTooLarge(
                    f"Upload is {declared} bytes; the limit is {cfg.server.max_upload_bytes} bytes."
                )
        if ep.operation == "retrieve":
            ex.stream = request.query_param("stream") == "true"

        pinned, bindings = await owned(self.gw.state, principal.tenant, refs)
        ex.pinned = pinned

        # Where it goes.
        rewritten = False
        model: str | None = None
        if ep.route in ("model", "form"):
            if match.prefix == DEPLOYMENTS:
                model = match.params["deployment"]
            elif body is not None:
                model = body.get("model")
            elif sep is not None:
                assert isinstance(raw, bytes)
                model = form_field(raw, sep, "model")
            if not model and not (ep.model_optional and pinned is not None):
                raise BadRequest(
                    "Missing required parameter: 'model' (a model name this gateway serves).",
                    code="missing_required_parameter",
                    param="model",
                )
        if model:
            ex.model = model
            targets = snap.router.targets(principal.tenant, tenant, model, pinned)
            attempts = self._attempts(snap, principal, request, match, targets, body, raw, sep)
            rewritten = body is not None
        else:
            if ep.route == "object":
                ex.model = bindings[0].model or None
            resource = pinned or snap.router.home(principal.tenant, tenant)
            attempts = [Attempt(self._resource_target(snap, resource), raw, [])]
        await self.gw.gate.admit(ex, principal.tenant, tenant, ex.model or "")
        if body is not None:
            await self._audit_request(ex, body, decisions, attempts)
        deleted = refs[0].id if ep.deletes else None
        keeper = Keeper(self.gw, ex, ep, cfg.state.response_retention_days * 86400.0, deleted)
        drop = _DROP_REWRITTEN if rewritten else _DROP_AS_SENT
        return await self._forward(request, ex, snap, attempts, drop, keeper, bool(refs))

    async def _body(self, request: Incoming, snap: Snapshot, ex: Exchange) -> bytes:
        server = snap.loaded.config.server
        raw = await read_body(
            request.receive,
            server.max_body_bytes,
            server.body_timeout_seconds,
            request.headers.get("content-length"),
        )
        ex.request_bytes = len(raw)
        return raw

    async def _audit_request(
        self,
        ex: Exchange,
        body: dict[str, Any],
        decisions: list[dict[str, Any]],
        attempts: list[Attempt],
    ) -> None:
        """Make the request's MCP audit records durable before anything goes upstream."""
        audit = self.gw.audit
        if not audit.enabled:
            return
        ex.target = attempts[0].target  # the first choice; response records name the actual one
        records = audit.request_records(ex, body, decisions)
        ex.target = None
        await audit.write(ex, records, before_forward=True)

    def _attempts(
        self,
        snap: Snapshot,
        principal: Principal,
        request: Incoming,
        match: Match,
        targets: tuple[Target, ...],
        body: dict[str, Any] | None,
        raw: Body,
        sep: bytes | None,
    ) -> list[Attempt]:
        """Rewrite every deployment name in the request for each target; drop unusable ones.

        The body's ``model`` (JSON or form field), a tool's ``model``, the image-generation
        header, and on the deployments prefix the path's deployment segment.
        """
        tenant = snap.loaded.config.tenants[principal.tenant]
        image_model = request.headers.get(IMAGE_DEPLOYMENT_HEADER)
        tools = (body.get("tools") if body is not None else None) or []
        tool_models = [(i, tool["model"]) for i, tool in enumerate(tools) if "model" in tool]
        query = request.query.decode("latin-1")
        form_model = (
            sep is not None and isinstance(raw, bytes) and field_span(raw, sep, "model") is not None
        )
        attempts: list[Attempt] = []
        for target in targets:
            path = None
            if match.prefix == DEPLOYMENTS:
                path = f"/openai/deployments/{target.deployment}{match.endpoint.path}"
                path += "?" + query if query else ""
            headers: list[tuple[str, str]] = []
            ok = True
            if image_model is not None:
                dep = snap.router.deployment_on(
                    principal.tenant, tenant, image_model, target.resource, IMAGE_DEPLOYMENT_HEADER
                )
                ok = dep is not None
                headers.append((IMAGE_DEPLOYMENT_HEADER, dep or ""))
            out_body: Body = raw
            if body is not None:
                out = dict(body)
                if match.prefix != DEPLOYMENTS or "model" in body:
                    out["model"] = target.deployment
                if tool_models and ok:
                    new_tools = list(tools)
                    for i, name in tool_models:
                        if name is None:
                            continue
                        dep = snap.router.deployment_on(
                            principal.tenant, tenant, name, target.resource, f"tools[{i}].model"
                        )
                        if dep is None:
                            ok = False
                            break
                        new_tools[i] = {**new_tools[i], "model": dep}
                    out["tools"] = new_tools
                out_body = dump_json(out)
                headers.append(("content-type", "application/json"))
            elif form_model:
                assert sep is not None and isinstance(raw, bytes)
                out_body = form_replace(raw, sep, "model", target.deployment)
            if ok:
                attempts.append(Attempt(target, out_body, headers, path))
        if not attempts:
            raise BadRequest(
                "No resource serving this model also deploys the model(s) its tools or the "
                f"{IMAGE_DEPLOYMENT_HEADER} header name.",
                code="model_not_on_resource",
            )
        return attempts

    def _resource_target(self, snap: Snapshot, resource: str) -> Target:
        res = snap.loaded.config.resources.get(resource)
        if res is None:
            raise NotFound("The resource holding this object is no longer configured.")
        return Target(resource, res.endpoint, res.region, "")

    # -- forwarding ---------------------------------------------------------

    async def _forward(
        self,
        request: Incoming,
        ex: Exchange,
        snap: Snapshot,
        attempts: list[Attempt],
        drop: frozenset[bytes],
        keeper: Keeper,
        named_objects: bool,
    ) -> ASGIApp:
        gw = self.gw
        scope = request.scope
        query = scope.get("query_string", b"")
        path = scope["path"] + ("?" + query.decode("latin-1") if query else "")
        breakers = gw.breakers
        candidates = [
            a for a in attempts if not a.target.deployment or breakers.state(a.target.key) != OPEN
        ]
        best = min(a.target.priority for a in attempts)
        upstream_cfg = snap.loaded.config.upstream
        stale_left = upstream_cfg.stale_read_retries if named_objects else 0
        n = 0
        while n < len(candidates):
            attempt = candidates[n]
            target = attempt.target
            guarded = bool(target.deployment)  # requests pinned to a resource have no choice
            if guarded and not breakers.acquire(target.key):
                n += 1
                continue  # another request is probing it
            last = n == len(candidates) - 1
            ex.attempts += 1
            try:
                auth = await gw.auth_header(snap, target.resource)
            except BaseException:
                if guarded:
                    breakers.release(target.key)
                raise
            if ex.traceparent_out is None:
                headers = request_headers(scope["headers"], ex.request_id, auth, drop)
            else:  # our span continues the trace upstream
                headers = request_headers(scope["headers"], ex.request_id, auth, drop | _TRACE)
                headers.append(("traceparent", ex.traceparent_out))
            headers += attempt.headers
            upload = attempt.body if isinstance(attempt.body, _Upload) else None
            if upload is not None:
                declared = request.headers.get("content-length")
                if declared and declared.isdigit():
                    headers.append(("content-length", declared))
            ex.upstream_started = time.perf_counter()
            try:
                resp = await gw.http.send(
                    request.method,
                    target.endpoint + (attempt.path or path),
                    headers,
                    attempt.body,
                    target.resource,
                )
            except UpstreamError as exc:
                if upload is not None and upload.failure is not None:
                    if guarded:
                        breakers.release(target.key)
                    raise upload.failure from exc  # the client's body, not the upstream, failed
                if guarded:
                    breakers.failure(target.key, None, None)
                for obs in gw.observers:
                    obs.upstream_failed(ex, target, None)
                if not last and exc.connect and upload is None:
                    log.warning(
                        "upstream connect failed; trying next target",
                        extra={"request_id": ex.request_id, "resource": target.resource},
                    )
                    n += 1
                    continue
                ex.target = target
                raise exc.error from exc
            except BaseException:  # cancelled: no verdict, so a probe must not stay taken
                if guarded:
                    breakers.release(target.key)
                raise
            if guarded:
                try:
                    if resp.status >= 400:
                        capacity = resp.status == 429 and capacity_429(await resp.read())
                        retry_after = retry_after_seconds(resp.headers)
                        breakers.failure(target.key, resp.status, retry_after, capacity)
                    else:
                        breakers.success(target.key)
                except BaseException:
                    breakers.release(target.key)
                    resp.close()
                    raise
            if (
                stale_left
                and resp.status in (400, 404)
                and target.resource == ex.pinned
                and upload is None
                and await _stale_read(resp)
            ):
                # Azure has not caught up with an object it just made on this resource.
                stale_left -= 1
                resp.close()
                for obs in gw.observers:
                    obs.stale_read(ex, target)
                tries = upstream_cfg.stale_read_retries - stale_left
                await asyncio.sleep(upstream_cfg.stale_read_backoff_seconds * tries)
                continue  # the same target again
            if resp.status >= 400:
                for obs in gw.observers:
                    obs.upstream_failed(ex, target, resp.status)
            if not last and resp.status in RETRYABLE_STATUS and upload is None:
                resp.close()
                log.warning(
                    "upstream refused; trying next target",
                    extra={
                        "request_id": ex.request_id,
                        "resource": target.resource,
                        "status": resp.status,
                    },
                )
                n += 1
                continue
            if keeper.lists is not None and request.method == "GET":
                keeper.next_page = self._pager(request, ex, target, headers, path)
            ex.target = target
            ex.spillover = guarded and target.priority > best
            ex.upstream_status = resp.status
            ex.upstream_request_id = resp.headers.get("x-request-id") or resp.headers.get(
                "apim-request-id"
            )
            ctype = resp.headers.get("content-type", "")
            if ctype.startswith("text/event-stream"):
                return StreamRelay(resp, ex, gw, keeper)
            if "json" in ctype or resp.status >= 400:
                return JsonRelay(resp, ex, gw, keeper)
            return RawRelay(resp, ex, gw, keeper)
        raise self._all_open(attempts, ex)

    def _pager(
        self,
        request: Incoming,
        ex: Exchange,
        target: Target,
        headers: list[tuple[str, str]],
        path: str,
    ) -> Callable[[str], Awaitable[Any]]:
        """Reads the next page of a list from the same target, with ``after`` = a cursor."""
        base = request.scope["path"]
        query = [
            (k, v)
            for k, v in parse_qsl(request.query.decode("latin-1"), keep_blank_values=True)
            if k != "after"
        ]

        async def next_page(cursor: str) -> Any:
            url = target.endpoint + base + "?" + urlencode([*query, ("after", cursor)])
            resp = await self.gw.http.send("GET", url, headers, None, target.resource)
            try:
                raw = await resp.read()
            finally:
                resp.close()
            if resp.status >= 300:
                log.warning(
                    "list walk stopped: upstream refused a page",
                    extra={"request_id": ex.request_id, "status": resp.status},
                )
                return None
            return parse_upstream(raw)

        return next_page

    def _all_open(self, attempts: list[Attempt], ex: Exchange) -> GatewayError:
        """Every target is skipped by its breaker: 429 if all were throttled, else 503."""
        until, throttled = self.gw.breakers.reopens_at(a.target.key for a in attempts)
        wait = max(0.0, until - time.time())
        seconds = max(1, math.ceil(wait))
        headers = {"retry-after": str(seconds), "retry-after-ms": str(int(wait * 1000))}
        model = ex.model or "this model"
        if throttled:
            return RateLimited(
                f"Every deployment serving '{model}' is throttled by Azure; retry after "
                f"{seconds} s.",
                code="all_targets_throttled",
                headers=headers,
            )
        return ServiceUnavailable(
            f"Every deployment serving '{model}' is failing and is skipped for now; retry "
            f"after {seconds} s.",
            code="no_healthy_target",
            headers=headers,
        )


async def _stale_read(resp: UpstreamResponse) -> bool:
    """Whether an error answer says an object is not there (Azure's stale read)."""
    body = parse_upstream(await resp.read())
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    message = error.get("message")
    if isinstance(code, str) and code in _STALE_CODES:
        return True
    return isinstance(message, str) and "not found" in message.lower()
