"""The rulebook: steps 2-8 of DESIGN.md for one request, whatever carried it.

An HTTP body, a Responses-socket ``response.create`` frame, a Realtime client event and a
batch line are the same request in different envelopes. Each transport parses only its
envelope (strict JSON, its path, query and form fields) into a ``Request`` and calls
``check``, which runs every rule in one order:

1. types — the fields the gateway reads, type-checked (400 naming the param);
2. one walk over the body — every stored-object id by shape, keys that differ from a key
   the gateway reads only by case, every model, every tool list, every MCP item;
3. tools — the tenant's tool types and MCP policy (``policy.py``), rewrites in place;
4. ownership — every id must be the tenant's (404 as if it did not exist); they choose
   the one resource the request can go to;
5. route — the model's targets (allowlist, region pin, the objects' resource, the
   socket's resource, batch deployments apart), or the objects' or home resource;
6. plans — per target, the body as it would go there: ``model`` and every other model it
   names (a tool's, a moderation model, a Realtime transcription model, the image
   header) rewritten to that resource's deployments; targets that lack one are dropped.

The answer is a refusal (a raised ``GatewayError``: status, code, param, message, which
each transport renders in its own envelope) or a ``Checked`` request. ``commit`` then
admits it (quotas and budgets, the part the transport needs) and makes its MCP audit
records durable before anything goes upstream. A new rule goes into ``policy.py`` and
is called from here, nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .breaker import OPEN
from .config import TenantConfig
from .errors import BadRequest, Unauthenticated
from .exchange import Exchange
from .guardrails import ContentFiltered, GuardrailUnavailable
from .keys import Principal
from .objects import Refs, owned
from .policy import check_tool_policy
from .routing import Target
from .state import Binding
from .validate import check_body, check_event, check_fields, check_tools, dump_json

if TYPE_CHECKING:
    from .runtime import Gateway, Snapshot

Record = dict[str, Any]


@dataclass(slots=True)
class Request:
    """A request as its transport parsed it, before any rule ran."""

    api: str  # whose body checks: "responses" (create, compact), "realtime" (an event), other
    body: dict[str, Any] | None
    refs: Refs = field(default_factory=Refs)  # ids the envelope named (path, query, form)
    route: str = "model"  # model | object | home | session (a socket's fixed target)
    model: str | None = None  # named by the envelope (path deployment, form field)
    model_optional: bool = False  # without a model, the named objects choose the resource
    image_model: str | None = None  # the image-generation deployment header
    batch: bool = False  # a batch line: batch deployments, no stream, no models of its own
    resource: str | None = None  # only targets on this resource (an open socket's)
    target: Target | None = None  # route "session": the connection's target
    skip_open: bool = False  # leave out targets whose breaker is open (a socket's first frame)
    operation: str = ""
    render: Callable[[dict[str, Any]], bytes] = dump_json  # the body as the envelope sends it


class Plan(NamedTuple):
    """The checked request as it goes to one target."""

    target: Target
    payload: bytes | None  # the rendered body (None: no JSON body)
    headers: list[tuple[str, str]]  # headers the rules set (the image deployment)


@dataclass(slots=True)
class Checked:
    """A request that passed every rule: where it may go, and what the audit records."""

    tenant_name: str
    tenant: TenantConfig
    body: dict[str, Any] | None
    model: str | None
    pinned: str | None
    bindings: list[Binding]
    plans: list[Plan]
    decisions: list[Record]
    refs: Refs
    operation: str

    @property
    def mcp(self) -> bool:
        """Whether the request carries MCP content (tools, items) or policy rewrites."""
        return bool(self.decisions or self.refs.mcp_items) or any(
            isinstance(t, dict) and t.get("type") == "mcp" for _, ts in self.refs.tools for t in ts
        )


IMAGE_DEPLOYMENT_HEADER = "x-ms-oai-image-generation-deployment"


def tenant_of(snap: Snapshot, principal: Principal) -> TenantConfig:
    """The tenant config of ``principal`` (401 when a reload removed the tenant)."""
    tenant = snap.loaded.config.tenants.get(principal.tenant)
    if tenant is None:
        raise Unauthenticated(
            "The tenant of this gateway key is no longer configured.", code="invalid_api_key"
        )
    return tenant


async def check(gw: Gateway, snap: Snapshot, principal: Principal, req: Request) -> Checked:
    """Run every rule on ``req``: the checked request, or raise the refusal."""
    tenant = tenant_of(snap, principal)
    name = principal.tenant
    body = req.body
    refs = req.refs
    if body is not None:
        if req.api == "responses":
            body = check_body(body)
        elif req.api == "realtime":
            body = check_event(body)
        else:
            body = check_fields(body)
        refs.body(body)
        check_tools(refs.tools)
        if req.batch and body.get("stream") is True:
            raise BadRequest(
                "A batch line cannot stream; drop 'stream'.",
                code="invalid_batch_line",
                param="stream",
            )
    decisions = check_tool_policy(name, tenant, refs.tools)
    pinned, bindings = await owned(gw.state, name, refs.refs)
    model, targets = _route(snap, principal, tenant, req, body, pinned, bindings)
    plans = _plans(gw, snap, principal, tenant, req, body, model, targets)
    return Checked(
        name, tenant, body, model, pinned, bindings, plans, decisions, refs, req.operation
    )


def _route(
    snap: Snapshot,
    principal: Principal,
    tenant: TenantConfig,
    req: Request,
    body: dict[str, Any] | None,
    pinned: str | None,
    bindings: list[Binding],
) -> tuple[str | None, tuple[Target, ...]]:
    """(the logical model, the targets in failover order)."""
    router = snap.router
    if req.route == "session":
        assert req.target is not None
        return None, (req.target,)
    model: Any = None
    if req.route == "model":
        model = req.model or (body.get("model") if body is not None else None)
        if not model and not (req.model_optional and pinned is not None):
            raise BadRequest(
                "Missing required parameter: 'model' (a model name this gateway serves).",
                code="missing_required_parameter",
                param="model",
            )
    if model:
        if req.batch:
            return model, router.batch_targets(principal.tenant, tenant, model, pinned=pinned)[:1]
        targets = router.targets(principal.tenant, tenant, model, pinned)
        if req.resource is not None:
            targets = tuple(t for t in targets if t.resource == req.resource)
            if not targets:
                raise BadRequest(
                    f"Model '{model}' is not served on the resource this connection uses; "
                    "open another connection for it.",
                    code="model_not_on_connection_resource",
                    param="model",
                )
        return model, targets
    if req.route == "object" or (req.operation == "batches.create" and bindings):
        model = bindings[0].model or None if bindings else None  # a batch's: its input file's
    resource = pinned or router.home(principal.tenant, tenant)
    res = snap.loaded.config.resources.get(resource)
    if res is None:
        raise BadRequest(
            "The resource holding these objects is no longer configured.",
            code="resource_removed",
        )
    return model, (Target(resource, res.endpoint, res.region, ""),)


def _plans(
    gw: Gateway,
    snap: Snapshot,
    principal: Principal,
    tenant: TenantConfig,
    req: Request,
    body: dict[str, Any] | None,
    model: str | None,
    targets: tuple[Target, ...],
) -> list[Plan]:
    """The request as each target would get it; targets that cannot serve a model it
    names (or whose breaker is open, for a socket's first frame) are left out."""
    router = snap.router
    routed = req.route == "model" and bool(targets[0].deployment)
    # Every model the request names besides the one it is routed by: mapped per target.
    extra = [m for m in req.refs.models if not (routed and m[0] == "model")]
    if extra and req.batch:
        raise BadRequest(
            f"'{extra[0][0]}' names a model of its own; batch lines run on one batch "
            "deployment and cannot name others.",
            code="invalid_batch_line",
            param=extra[0][0],
        )
    plans: list[Plan] = []
    missing: str | None = None  # a model some target lacks (named when none is left)
    for target in targets:
        if req.skip_open and gw.breakers.state(target.key) == OPEN:
            continue
        headers: list[tuple[str, str]] = []
        if req.image_model is not None:
            dep = router.deployment_on(
                principal.tenant, tenant, req.image_model, target.resource, IMAGE_DEPLOYMENT_HEADER
            )
            if dep is None:
                continue
            headers.append((IMAGE_DEPLOYMENT_HEADER, dep))
        if body is None:
            plans.append(Plan(target, None, headers))
            continue
        missing = _map_models(router, principal, tenant, extra, target)
        if missing is not None:
            continue
        if routed and "model" in body:
            body["model"] = target.deployment
        plans.append(Plan(target, req.render(body), headers))
    if not plans:
        if req.resource is not None or req.route == "session":
            raise BadRequest(
                "The resource this connection uses does not deploy the model(s) this event "
                "names; open another connection for them.",
                code="model_not_on_connection_resource",
                param=missing or "model",
            )
        raise BadRequest(
            "No resource serving this model (and not skipped for failing) also deploys the "
            f"model(s) its tools or the {IMAGE_DEPLOYMENT_HEADER} header name.",
            code="model_not_on_resource",
            param=missing,
        )
    return plans


def _map_models(
    router: Any,
    principal: Principal,
    tenant: TenantConfig,
    extra: list[tuple[str, Any, dict[str, Any], str]],
    target: Target,
) -> str | None:
    """Rewrite every extra model in place to its deployment on ``target``'s resource; the
    param of one the resource lacks (None: all mapped). Each must be a model the tenant
    may use."""
    for param, name, parent, key in extra:
        dep = router.deployment_on(principal.tenant, tenant, name, target.resource, param)
        if dep is None:
            return param
        parent[key] = dep
    return None


async def commit(
    gw: Gateway,
    ex: Exchange,
    checked: Checked,
    admit: str | None,
    more_records: Callable[[Exchange], list[Record]] | None = None,
) -> None:
    """Steps 4-5 for a checked request: admit it (``admit``: the quota part the transport
    needs, ``all``, ``rate`` or None) and the batch budget, then make its MCP audit records
    durable before it goes upstream (refused with 503 when they cannot be written)."""
    if ex.model is None:
        ex.model = checked.model
    if checked.pinned is not None:
        ex.pinned = checked.pinned
    verdicts = await _guardrails(gw, ex, checked)
    if admit is not None:
        await gw.gate.admit(ex, checked.tenant_name, checked.tenant, ex.model or "", admit)
    if checked.operation == "batches.create":
        body = checked.body or {}
        await gw.batches.admit(ex, checked.tenant, checked.bindings, body.get("input_file_id"))
    audit = gw.audit
    if not audit.enabled or not (checked.mcp or more_records or verdicts):
        return
    restore = ex.target
    if ex.target is None:
        ex.target = checked.plans[0].target  # the first choice; answers name the actual one
    try:
        refs = checked.refs
        records = audit.request_records(ex, refs.tools, refs.mcp_items, checked.decisions)
        if more_records is not None:
            records += more_records(ex)
        records += [{**audit.base(ex, "guardrail.verdict"), **v} for v in verdicts]
    finally:
        ex.target = restore
    await audit.write(ex, records, before_forward=True)


async def _guardrails(gw: Gateway, ex: Exchange, checked: Checked) -> list[Record]:
    """The tenant's Content Safety checks of what the request carries (``guardrails.py``);
    a refusal's verdicts are audited before it is answered."""
    if gw.guard is None:
        return []
    try:
        return await gw.guard.check_request(checked.tenant_name, checked.tenant, checked.body)
    except (ContentFiltered, GuardrailUnavailable) as exc:
        if exc.records and gw.audit.enabled:
            restore = ex.target
            if ex.target is None and checked.plans:
                ex.target = checked.plans[0].target
            base = gw.audit.base(ex, "guardrail.verdict")
            ex.target = restore
            records = [{**base, **r} for r in exc.records]
            await gw.audit.write(ex, records, before_forward=False)
        raise
