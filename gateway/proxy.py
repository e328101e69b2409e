"""The Responses surface: authenticate, authorize, route, forward, relay, remember."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from .audit import check_mcp_policy
from .errors import BadRequest, GatewayError, NotFound, PayloadTooLarge
from .exchange import Exchange
from .keys import Principal
from .policy import check_tools
from .relay import ErrorResponse, JsonRelay, StreamRelay
from .routing import Target
from .runtime import Gateway, Snapshot, client_address
from .state import Binding
from .upstream import (
    RETRYABLE_STATUS,
    is_connect_failure,
    map_transport_error,
    request_headers,
    safe_request_id,
)

log = logging.getLogger("gateway.proxy")

_RESPONSE_ID = re.compile(r"^[A-Za-z0-9_\-]{1,256}$")
IMAGE_DEPLOYMENT_HEADER = "x-ms-oai-image-generation-deployment"

Handler = Callable[[Request], Awaitable[Any]]


class Attempt:
    """One upstream target with the request body rewritten for it."""

    __slots__ = ("body", "headers", "target")

    def __init__(self, target: Target, body: bytes | None, headers: list[tuple[str, str]]) -> None:
        self.target = target
        self.body = body
        self.headers = headers


def _exchange(request: Request, operation: str, snap: Snapshot) -> Exchange:
    rid = safe_request_id(request.headers.get("x-request-id")) or uuid.uuid4().hex
    peer = request.client.host if request.client else None
    client = client_address(peer, request.headers.get("x-forwarded-for"), snap)
    return Exchange(request_id=rid, operation=operation, method=request.method, client=client)


async def _read_json(request: Request, limit: int, ex: Exchange) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    ex.request_bytes = size
    if not raw.strip():
        raise BadRequest("Request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        where = (
            f" at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise BadRequest(f"Request body is not valid JSON{where}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    return body


def _response_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not _RESPONSE_ID.match(value):
        raise NotFound(f"No response found with id {str(value)[:64]!r}.", param=param)
    return value


class _Endpoint:
    """An ASGI app for one operation (a class, so Starlette passes scope/receive/send)."""

    def __init__(
        self,
        gw: Gateway,
        operation: str,
        handler: Callable[[Request, Exchange], Awaitable[Any]],
    ) -> None:
        self.gw = gw
        self.operation = operation
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        ex = _exchange(request, self.operation, self.gw.snap)
        for obs in self.gw.observers:
            obs.started(ex)
        try:
            response = await self.handler(request, ex)
        except GatewayError as exc:
            response = ErrorResponse(exc, ex, self.gw)
        await response(scope, receive, send)


class Proxy:
    """Request handlers for each Responses operation."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    # -- entry points -------------------------------------------------------

    def endpoint(self, operation: str) -> _Endpoint:
        """An ASGI endpoint for ``operation``."""
        handler = {
            "create": self._create,
            "compact": self._create,
            "input_tokens": self._create,
            "retrieve": self._by_id,
            "delete": self._by_id,
            "cancel": self._by_id,
            "input_items": self._by_id,
        }[operation]

        return _Endpoint(self.gw, operation, handler)

    # -- operations ---------------------------------------------------------

    async def _owned(self, principal: Principal, response_id: str, param: str) -> Binding:
        binding = await self.gw.state.get_binding(response_id)
        if binding is None or binding.tenant != principal.tenant:
            raise NotFound(f"No response found with id '{response_id}'.", param=param)
        return binding

    async def _create(self, request: Request, ex: Exchange) -> Any:
        snap = self.gw.snap
        principal = snap.keyring.authenticate(request.headers)
        ex.principal = principal
        tenant = snap.loaded.config.tenants[principal.tenant]
        body = await _read_json(request, snap.loaded.config.server.max_body_bytes, ex)
        check_tools(principal.tenant, tenant, body.get("tools"))
        decisions = check_mcp_policy(principal.tenant, tenant.mcp, body.get("tools"))
        model = body.get("model")
        ex.stream = body.get("stream") is True
        pinned = None
        prev = body.get("previous_response_id")
        if prev is not None:
            prev = _response_id(prev, "previous_response_id")
            ex.previous_response_id = prev
            pinned = (await self._owned(principal, prev, "previous_response_id")).resource
        if model is None and pinned is not None and ex.operation != "create":
            target = self._resource_target(snap, pinned)
            attempts = [Attempt(target, json.dumps(body).encode(), [])]
            await self.gw.gate.admit(ex, principal.tenant, tenant, "")
            await self._audit_request(ex, body, decisions, attempts)
            return await self._forward(request, ex, snap, attempts)
        if not isinstance(model, str) or not model:
            raise BadRequest(
                "Missing required parameter: 'model' (a model name this gateway serves).",
                code="missing_required_parameter",
                param="model",
            )
        ex.model = model
        targets = snap.router.targets(principal.tenant, tenant, model, pinned)
        attempts = self._attempts(snap, principal, body, request, targets)
        await self.gw.gate.admit(ex, principal.tenant, tenant, model)
        await self._audit_request(ex, body, decisions, attempts)
        return await self._forward(request, ex, snap, attempts)

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
        body: dict[str, Any],
        request: Request,
        targets: tuple[Target, ...],
    ) -> list[Attempt]:
        """Rewrite every deployment name in the request for each target; drop unusable ones."""
        tenant = snap.loaded.config.tenants[principal.tenant]
        image_model = request.headers.get(IMAGE_DEPLOYMENT_HEADER)
        tools = body.get("tools")
        tool_models = [
            (i, tool["model"])
            for i, tool in enumerate(tools if isinstance(tools, list) else [])
            if isinstance(tool, dict) and isinstance(tool.get("model"), str)
        ]
        attempts: list[Attempt] = []
        for target in targets:
            out = dict(body)
            out["model"] = target.deployment
            headers: list[tuple[str, str]] = []
            ok = True
            if image_model is not None:
                dep = snap.router.deployment_on(
                    principal.tenant, tenant, image_model, target.resource, IMAGE_DEPLOYMENT_HEADER
                )
                ok = dep is not None
                headers.append((IMAGE_DEPLOYMENT_HEADER, dep or ""))
            if tool_models and ok:
                new_tools = list(tools)  # type: ignore[arg-type]
                for i, name in tool_models:
                    dep = snap.router.deployment_on(
                        principal.tenant, tenant, name, target.resource, f"tools[{i}].model"
                    )
                    if dep is None:
                        ok = False
                        break
                    new_tools[i] = {**new_tools[i], "model": dep}
                out["tools"] = new_tools
            if ok:
                attempts.append(Attempt(target, json.dumps(out).encode(), headers))
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
            raise NotFound("The resource holding this response is no longer configured.")
        return Target(resource, res.endpoint, res.region, "")

    async def _by_id(self, request: Request, ex: Exchange) -> Any:
        snap = self.gw.snap
        principal = snap.keyring.authenticate(request.headers)
        ex.principal = principal
        rid = _response_id(request.path_params["response_id"], "response_id")
        ex.response_id = rid
        binding = await self._owned(principal, rid, "response_id")
        ex.model = binding.model or None
        tenant = snap.loaded.config.tenants[principal.tenant]
        await self.gw.gate.admit(ex, principal.tenant, tenant, binding.model)
        body = None
        if request.method == "POST":
            raw = await request.body()
            body = raw if raw else None
        ex.stream = request.query_params.get("stream") == "true"
        attempt = Attempt(self._resource_target(snap, binding.resource), body, [])
        return await self._forward(request, ex, snap, [attempt])

    # -- forwarding ---------------------------------------------------------

    async def _forward(
        self, request: Request, ex: Exchange, snap: Snapshot, attempts: list[Attempt]
    ) -> Any:
        gw = self.gw
        incoming = request.headers.items()
        drop = {IMAGE_DEPLOYMENT_HEADER}
        base = [(k, v) for k, v in incoming if k not in drop]
        path = request.url.path
        query = request.scope.get("query_string", b"")
        for n, attempt in enumerate(attempts):
            last = n == len(attempts) - 1
            target = attempt.target
            ex.attempts += 1
            auth = await gw.auth_header(snap, target.resource)
            headers = request_headers(base, ex.request_id, auth) + attempt.headers
            if attempt.body is not None:
                headers.append(("content-type", "application/json"))
            url = httpx.URL(target.endpoint + path, query=query)
            upstream_req = gw.http.build_request(
                request.method, url, headers=headers, content=attempt.body
            )
            ex.upstream_started = time.perf_counter()
            try:
                resp = await gw.http.send(upstream_req)
            except httpx.HTTPError as exc:
                for obs in gw.observers:
                    obs.upstream_failed(ex, target, None)
                if not last and is_connect_failure(exc):
                    log.warning(
                        "upstream connect failed; trying next target",
                        extra={"request_id": ex.request_id, "resource": target.resource},
                    )
                    continue
                ex.target = target
                raise map_transport_error(exc, target.resource) from exc
            if resp.status_code >= 400:
                for obs in gw.observers:
                    obs.upstream_failed(ex, target, resp.status_code)
            if not last and resp.status_code in RETRYABLE_STATUS:
                await resp.aclose()
                log.warning(
                    "upstream refused; trying next target",
                    extra={
                        "request_id": ex.request_id,
                        "resource": target.resource,
                        "status": resp.status_code,
                    },
                )
                continue
            ex.target = target
            ex.upstream_status = resp.status_code
            ex.upstream_request_id = resp.headers.get("x-request-id") or resp.headers.get(
                "apim-request-id"
            )
            bind = self._binder(ex, snap) if ex.operation == "create" else None
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                return StreamRelay(resp, ex, gw, bind)
            return JsonRelay(resp, ex, gw, bind)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _binder(self, ex: Exchange, snap: Snapshot) -> Callable[[str], Awaitable[None]]:
        ttl = snap.loaded.config.state.response_retention_days * 86400.0
        assert ex.principal is not None and ex.target is not None
        binding = Binding(ex.principal.tenant, ex.target.resource, ex.model or "")

        async def bind(response_id: str) -> None:
            ex.response_id = response_id
            await self.gw.state.bind_response(response_id, binding, ttl)

        return bind
