"""The Responses surface: authenticate, authorize, route, forward, relay, remember."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Receive

from .audit import check_mcp_policy
from .breaker import OPEN, capacity_429, retry_after_seconds
from .errors import (
    BadRequest,
    ClientClosed,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
)
from .exchange import Exchange
from .keys import Principal
from .lifecycle import Incoming, Operation
from .policy import check_tools
from .relay import JsonRelay, StreamRelay
from .routing import Target
from .runtime import Gateway, Snapshot
from .state import Binding
from .upstream import RETRYABLE_STATUS, UpstreamError, request_headers
from .validate import check_body, check_headers, dump_json, parse_json

log = logging.getLogger("gateway.proxy")

_RESPONSE_ID = re.compile(r"^[A-Za-z0-9_\-]{1,256}$")
IMAGE_DEPLOYMENT_HEADER = "x-ms-oai-image-generation-deployment"
# The create path re-serialises the body it checked, so the client's content-type
# goes and the gateway sets its own; by-id bodies are forwarded as sent.
_DROP_REWRITTEN = frozenset({IMAGE_DEPLOYMENT_HEADER.encode(), b"content-type"})
_DROP_AS_SENT = frozenset({IMAGE_DEPLOYMENT_HEADER.encode()})
_TRACE = frozenset({b"traceparent"})


class Attempt:
    """One upstream target with the request body rewritten for it."""

    __slots__ = ("body", "headers", "target")

    def __init__(self, target: Target, body: bytes | None, headers: list[tuple[str, str]]) -> None:
        self.target = target
        self.body = body
        self.headers = headers


async def read_body(
    receive: Receive, limit: int, idle_timeout: float, declared: str | None
) -> bytes:
    """The whole request body, refused past ``limit`` bytes or ``idle_timeout`` of silence."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    body = bytearray()
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(
                f"The request body stopped arriving for {idle_timeout:g} s; send it whole."
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientClosed("The client disconnected while sending the body.")
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        if not message.get("more_body", False):
            return bytes(body)


def _response_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not _RESPONSE_ID.match(value):
        raise NotFound(f"No response found with id {str(value)[:64]!r}.", param=param)
    return value


class Proxy:
    """Request handlers for each Responses operation."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    # -- entry points -------------------------------------------------------

    def endpoint(self, operation: str) -> Operation:
        """An ASGI endpoint for ``operation``, owned by the lifecycle."""
        handler = {
            "create": self._create,
            "compact": self._create,
            "input_tokens": self._create,
            "retrieve": self._by_id,
            "delete": self._by_id,
            "cancel": self._by_id,
            "input_items": self._by_id,
        }[operation]
        return Operation(self.gw, operation, handler)

    # -- operations ---------------------------------------------------------

    async def _owned(self, principal: Principal, response_id: str, param: str) -> Binding:
        binding = await self.gw.state.get_binding(response_id)
        if binding is None or binding.tenant != principal.tenant:
            raise NotFound(f"No response found with id '{response_id}'.", param=param)
        return binding

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

    async def _create(self, request: Incoming, ex: Exchange) -> ASGIApp:
        snap = self.gw.snap
        check_headers(request.scope["headers"])
        principal = snap.keyring.authenticate(request.headers)
        ex.principal = principal
        tenant = snap.loaded.config.tenants[principal.tenant]
        raw = await self._body(request, snap, ex)
        if not raw.strip():
            raise BadRequest("Request body is empty; send a JSON object.", code="invalid_json")
        body = check_body(parse_json(raw, snap.loaded.config.server.max_json_depth))
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
            attempts = [Attempt(target, dump_json(body), [])]
            await self.gw.gate.admit(ex, principal.tenant, tenant, "")
            await self._audit_request(ex, body, decisions, attempts)
            return await self._forward(request, ex, snap, attempts, _DROP_REWRITTEN)
        if not model:
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
        return await self._forward(request, ex, snap, attempts, _DROP_REWRITTEN)

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
        request: Incoming,
        targets: tuple[Target, ...],
    ) -> list[Attempt]:
        """Rewrite every deployment name in the request for each target; drop unusable ones."""
        tenant = snap.loaded.config.tenants[principal.tenant]
        image_model = request.headers.get(IMAGE_DEPLOYMENT_HEADER)
        tools = body.get("tools") or []
        tool_models = [(i, tool["model"]) for i, tool in enumerate(tools) if "model" in tool]
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
            if ok:
                attempts.append(Attempt(target, dump_json(out), headers))
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

    async def _by_id(self, request: Incoming, ex: Exchange) -> ASGIApp:
        snap = self.gw.snap
        check_headers(request.scope["headers"])
        principal = snap.keyring.authenticate(request.headers)
        ex.principal = principal
        rid = _response_id(request.path_params["response_id"], "response_id")
        ex.response_id = rid
        binding = await self._owned(principal, rid, "response_id")
        ex.model = binding.model or None
        tenant = snap.loaded.config.tenants[principal.tenant]
        body = None
        if request.method == "POST":
            body = await self._body(request, snap, ex) or None
        await self.gw.gate.admit(ex, principal.tenant, tenant, binding.model)
        ex.stream = request.query_param("stream") == "true"
        attempt = Attempt(self._resource_target(snap, binding.resource), body, [])
        return await self._forward(request, ex, snap, [attempt], _DROP_AS_SENT)

    # -- forwarding ---------------------------------------------------------

    async def _forward(
        self,
        request: Incoming,
        ex: Exchange,
        snap: Snapshot,
        attempts: list[Attempt],
        drop: frozenset[bytes],
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
        for n, attempt in enumerate(candidates):
            target = attempt.target
            guarded = bool(target.deployment)  # requests pinned to a resource have no choice
            if guarded and not breakers.acquire(target.key):
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
            if drop is _DROP_REWRITTEN and attempt.body is not None:
                headers.append(("content-type", "application/json"))
            ex.upstream_started = time.perf_counter()
            try:
                resp = await gw.http.send(
                    request.method, target.endpoint + path, headers, attempt.body, target.resource
                )
            except UpstreamError as exc:
                if guarded:
                    breakers.failure(target.key, None, None)
                for obs in gw.observers:
                    obs.upstream_failed(ex, target, None)
                if not last and exc.connect:
                    log.warning(
                        "upstream connect failed; trying next target",
                        extra={"request_id": ex.request_id, "resource": target.resource},
                    )
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
            if resp.status >= 400:
                for obs in gw.observers:
                    obs.upstream_failed(ex, target, resp.status)
            if not last and resp.status in RETRYABLE_STATUS:
                resp.close()
                log.warning(
                    "upstream refused; trying next target",
                    extra={
                        "request_id": ex.request_id,
                        "resource": target.resource,
                        "status": resp.status,
                    },
                )
                continue
            ex.target = target
            ex.spillover = guarded and target.priority > best
            ex.upstream_status = resp.status
            ex.upstream_request_id = resp.headers.get("x-request-id") or resp.headers.get(
                "apim-request-id"
            )
            bind = self._binder(ex, snap) if ex.operation == "create" else None
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                return StreamRelay(resp, ex, gw, bind)
            return JsonRelay(resp, ex, gw, bind)
        raise self._all_open(attempts, ex)

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

    def _binder(self, ex: Exchange, snap: Snapshot) -> Callable[[str], Awaitable[None]]:
        ttl = snap.loaded.config.state.response_retention_days * 86400.0
        assert ex.principal is not None and ex.target is not None
        binding = Binding(ex.principal.tenant, ex.target.resource, ex.model or "")

        async def bind(response_id: str) -> None:
            ex.response_id = response_id
            await self.gw.state.bind_response(response_id, binding, ttl)

        return bind
