"""The admin API: gateway keys at runtime (create, list, retrieve, rotate, revoke) and the
usage ledger, for gateway admins and tenant admins.

An admin credential is sent like a key (``Authorization: Bearer`` or ``api-key``) and is
one of ``admin.key_sha256`` (a gateway admin, id ``admin``) or ``admin.keys[]`` (with the
tenants it manages; ``["*"]`` for all). A tenant admin acting on another tenant gets 403.
Errors are OpenAI-shaped; every change is a record in the audit chain naming the actor.
Keys made here live in the state backend (``state/keystore.py``), hashed; the secret is
in the 201 answer only. Config keys are listed too (``"source": "config"``) but are
changed in the config: rotate and revoke answer 409 ``key_in_config``.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from .admin_entra import EntraVerifier, looks_like_jwt
from .body import read_body
from .config import region_ok
from .errors import BadRequest, Forbidden, GatewayError, NotFound, Unauthenticated
from .exchange import Exchange
from .keys import digest_of, hash_key, new_key, presented_key
from .lifecycle import Incoming, Operation
from .objects import shape_kind
from .runtime import Gateway
from .state import Binding
from .state.keystore import ApiKey
from .usage import UsageQueryError, render, report
from .validate import dump_json, parse_json

_NAME = re.compile(r"^[\x20-\x7e]{1,64}\Z")
_KEY_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
MAX_GRACE = 7 * 86400
MAX_BODY = 1 << 20  # an admin request's body (a key, a list of ids): never more
_CREATE_FIELDS = frozenset({"tenant", "name", "expires_at", "metadata"})
_ID = re.compile(r"^[A-Za-z0-9_-]{1,256}\Z")
# What an admin may adopt: the kinds of the route table's stored objects.
ADOPTABLE = ("file", "vector_store", "conversation", "container", "response")


class Admin(NamedTuple):
    """Who is acting: an admin key's id, and the tenants it manages (``*``: all)."""

    id: str
    tenants: tuple[str, ...]

    def may(self, tenant: str) -> bool:
        return "*" in self.tenants or tenant in self.tenants


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


def rfc3339(epoch: float | None) -> str | None:
    """An epoch time as RFC 3339 in UTC (``2026-12-07T10:00:00Z``)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any, param: str) -> float:
    """An RFC 3339 time with a zone, as epoch seconds (400 otherwise)."""
    if not isinstance(value, str):
        raise BadRequest(f"'{param}' must be an RFC 3339 time string.", param=param)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"'{param}' is not an RFC 3339 time (like 2027-01-31T00:00:00Z).", param=param
        ) from None
    if when.tzinfo is None:
        raise BadRequest(f"'{param}' needs a time zone (like ...T00:00:00Z).", param=param)
    return when.timestamp()


class AdminApi:
    """The admin endpoints over one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._entra: tuple[Any, EntraVerifier] | None = None  # (config it serves, verifier)

    def routes(self) -> list[Route]:
        """The admin endpoints, each owned by the lifecycle like every other request
        (an OpenAI-shaped error with its ``x-request-id``, an access line naming the
        actor, metrics, a bounded body)."""

        def op(name: str, fn: Callable[[Request, Admin], Awaitable[Response]]) -> Operation:
            return Operation(self.gw, name, self._handler(fn))

        return [
            Route("/admin/keys", op("admin.keys.create", self.create), methods=["POST"]),
            Route("/admin/keys", op("admin.keys.list", self.list_keys), methods=["GET"]),
            Route(
                "/admin/keys/{key_id}", op("admin.keys.retrieve", self.retrieve), methods=["GET"]
            ),
            Route("/admin/keys/{key_id}", op("admin.keys.revoke", self.revoke), methods=["DELETE"]),
            Route(
                "/admin/keys/{key_id}/rotate",
                op("admin.keys.rotate", self.rotate),
                methods=["POST"],
            ),
            Route("/admin/objects", op("admin.objects.adopt", self.adopt), methods=["POST"]),
            Route("/admin/usage", op("admin.usage", self.usage), methods=["GET"]),
        ]

    def _handler(
        self, fn: Callable[[Request, Admin], Awaitable[Response]]
    ) -> Callable[[Incoming, Exchange], Awaitable[ASGIApp]]:
        async def handler(incoming: Incoming, ex: Exchange) -> ASGIApp:
            request = Request(incoming.scope, incoming.receive)
            admin = await self.authenticate(request)
            ex.actor = admin.id
            response = await fn(request, admin)
            response.headers["x-request-id"] = ex.request_id
            return response

        return handler

    async def authenticate(self, request: Request) -> Admin:
        """The admin behind the request's credential (401 otherwise)."""
        cfg = self.gw.snap.loaded.config.admin
        if cfg.key_sha256 is None and not cfg.keys and cfg.entra is None:
            raise NotFound("The admin API is not enabled on this gateway.")
        key = presented_key(request.headers.raw)
        if key is None:
            raise Unauthenticated("The admin API needs an admin key.", code="invalid_admin_key")
        if cfg.entra is not None and looks_like_jwt(key):
            if self._entra is None or self._entra[0] is not cfg.entra:
                self._entra = (cfg.entra, EntraVerifier(cfg.entra))
            actor, tenants = await self._entra[1].verify(key)
            return Admin(actor, tenants)
        digest = digest_of(key).hex()
        if cfg.key_sha256 is not None and hmac.compare_digest(digest, cfg.key_sha256):
            return Admin("admin", ("*",))
        for akey in cfg.keys:
            if hmac.compare_digest(digest, akey.sha256):
                return Admin(akey.id, akey.tenants)
        raise Unauthenticated("The admin API needs an admin key.", code="invalid_admin_key")

    # -- keys --------------------------------------------------------------

    async def create(self, request: Request, admin: Admin) -> Response:
        body = await _json(request)
        unknown = sorted(set(body) - _CREATE_FIELDS)
        if unknown:
            raise BadRequest(f"Unknown field '{unknown[0]}'.", param=unknown[0])
        tenant = self._tenant(body.get("tenant"), admin)
        name = body.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequest("'name' must be 1 to 64 printable ASCII characters.", param="name")
        expires = body.get("expires_at")
        expires_at = parse_time(expires, "expires_at") if expires is not None else None
        if expires_at is not None and expires_at <= time.time():
            raise BadRequest("'expires_at' is in the past.", param="expires_at")
        metadata = _metadata(body.get("metadata"))
        secret = new_key()
        key = ApiKey(
            "key_" + secrets.token_hex(12),
            tenant,
            name,
            float(int(time.time())),
            expires_at,
            ((hash_key(secret), None),),
            metadata,
        )
        await self._audit(admin, "admin.key_created", key)
        await self.gw.keys.store.put(key)
        await self.gw.keys.refresh()
        return _json_response({**self._view(key), "key": secret}, 201)

    async def list_keys(self, request: Request, admin: Admin) -> Response:
        tenant = request.query_params.get("tenant")
        if tenant is not None:
            self._tenant(tenant, admin)
        rows = [r for r in await self._all() if admin.may(r["tenant"])]
        if tenant is not None:
            rows = [r for r in rows if r["tenant"] == tenant]
        return _json_response({"object": "list", "data": rows})

    async def retrieve(self, request: Request, admin: Admin) -> Response:
        key_id = request.path_params["key_id"]
        for row in await self._all():
            if row["id"] == key_id:
                self._tenant(row["tenant"], admin)
                return _json_response(row)
        raise NotFound(f"No key with id '{_shown(key_id)}'.", param="key_id")

    async def rotate(self, request: Request, admin: Admin) -> Response:
        key = await self._api_key(request, admin)
        body = await _json(request, allow_empty=True)
        grace = body.get("grace_seconds", 0)
        if not isinstance(grace, int) or isinstance(grace, bool) or not 0 <= grace <= MAX_GRACE:
            raise BadRequest(
                f"'grace_seconds' must be a whole number from 0 to {MAX_GRACE}.",
                param="grace_seconds",
            )
        now = time.time()
        secret = new_key()
        # The secret in use (and any still in an earlier grace) opens the key `grace` more
        # seconds; with 0 every older secret stops at once.
        kept: list[tuple[str, float | None]] = []
        for h, until in key.hashes if grace else ():
            end = now + grace if until is None else until
            if end > now:
                kept.append((h, end))
        dropped = tuple(h for h, _ in key.hashes if h not in {k for k, _ in kept})
        new = key._replace(hashes=((hash_key(secret), None), *kept))
        await self._audit(admin, "admin.key_rotated", new, grace_seconds=grace)
        await self.gw.keys.store.put(new, dropped)
        self.gw.keys.forget(key)
        await self.gw.keys.refresh()
        last = (await self._used()).get(new.id)  # a rotation keeps when the key was last used
        return _json_response({**self._view(new, last), "key": secret}, 201)

    async def revoke(self, request: Request, admin: Admin) -> Response:
        key = await self._api_key(request, admin)
        await self._audit(admin, "admin.key_revoked", key)
        await self.gw.keys.store.delete(key)
        self.gw.keys.forget(key)
        await self.gw.keys.refresh()
        return _json_response({"id": key.id, "revoked": True})

    # -- adoption ----------------------------------------------------------

    async def adopt(self, request: Request, admin: Admin) -> Response:
        """Bind objects made around the gateway (straight on a resource) to a tenant."""
        body = await _json(request)
        unknown = sorted(set(body) - {"tenant", "resource", "kind", "ids"})
        if unknown:
            raise BadRequest(f"Unknown field '{unknown[0]}'.", param=unknown[0])
        tenant = self._tenant(body.get("tenant"), admin)
        cfg = self.gw.snap.loaded.config
        resource = body.get("resource")
        if not isinstance(resource, str) or resource not in cfg.resources:
            raise BadRequest("'resource' must name a resource of the config.", param="resource")
        kind = body.get("kind")
        if kind not in ADOPTABLE:
            raise BadRequest(f"'kind' must be one of {', '.join(ADOPTABLE)}.", param="kind")
        region = cfg.resources[resource].region
        if not region_ok(cfg.tenants[tenant], region):
            raise Forbidden(
                f"Resource '{resource}' is in {region}, outside the regions tenant "
                f"'{tenant}' is pinned to (data residency); its objects cannot be adopted.",
                code="region_not_allowed",
                param="resource",
            )
        ids = body.get("ids")
        if not isinstance(ids, list) or not 0 < len(ids) <= 1000:
            raise BadRequest("'ids' must be a list of 1 to 1000 ids.", param="ids")
        for i, oid in enumerate(ids):
            if (
                not isinstance(oid, str)
                or not _ID.match(oid)
                or shape_kind(oid) not in (None, kind)
            ):
                raise BadRequest(
                    f"ids[{i}] is not an id of a {kind}.", code="invalid_id", param=f"ids[{i}]"
                )
        if kind == "file":
            # The files of batches still under way are another tenant's work before
            # anyone has seen them: learn them from Azure first.
            await self.gw.batches.learn_files(resource)
        state = self.gw.state
        found = [await state.get_binding(oid) for oid in ids]
        for i, binding in enumerate(found):
            if binding is not None and binding.tenant != tenant:
                raise Conflict(
                    f"ids[{i}] is bound to another tenant already; nothing was adopted.",
                    code="object_owned",
                    param=f"ids[{i}]",
                )
        await self._audit(
            admin, "admin.objects_adopted", None, tenant=tenant, resource=resource, kind=kind,
            ids=ids,
        )  # fmt: skip
        ttl = cfg.state.response_retention_days * 86400.0
        adopted = []
        for oid, binding in zip(ids, found, strict=True):
            if binding is None:
                await state.bind_response(oid, Binding(tenant, resource, "", kind), ttl)
                adopted.append(oid)
        return _json_response({"tenant": tenant, "kind": kind, "adopted": adopted})

    # -- usage -------------------------------------------------------------

    async def usage(self, request: Request, admin: Admin) -> Response:
        q = request.query_params
        fmt = q.get("format", "json")
        cfg = self.gw.snap.loaded.config
        tenant = q.get("tenant")
        if tenant is not None:
            self._tenant(tenant, admin)
        elif "*" not in admin.tenants:
            raise Forbidden("A tenant admin reads the usage of one tenant: give tenant=NAME.")
        try:
            if fmt not in ("json", "csv"):
                raise UsageQueryError("format is json or csv")
            start, end = q.get("from"), q.get("to")
            if not start or not end:
                raise UsageQueryError("give from=YYYY-MM-DD and to=YYYY-MM-DD")
            rows = await report(self.gw.state, cfg, start, end, tenant)
        except UsageQueryError as exc:
            raise BadRequest(f"Usage report: {exc}.", code="invalid_usage_query") from None
        media = "application/json" if fmt == "json" else "text/csv"
        return Response(render(rows, fmt), media_type=media)

    # -- helpers -----------------------------------------------------------

    def _tenant(self, value: Any, admin: Admin) -> str:
        if not isinstance(value, str) or not value:
            raise BadRequest("'tenant' must name a tenant of the config.", param="tenant")
        if not admin.may(value):
            raise Forbidden(
                f"Admin '{admin.id}' does not manage tenant '{_shown(value)}'.",
                code="tenant_not_managed",
            )
        if value not in self.gw.snap.loaded.config.tenants:
            raise BadRequest(f"No tenant '{_shown(value)}' in the config.", param="tenant")
        return value

    async def _api_key(self, request: Request, admin: Admin) -> ApiKey:
        """The runtime key named in the path (409 for a config key, 404 for none)."""
        key_id = request.path_params["key_id"]
        if not _KEY_ID.match(key_id):
            raise NotFound(f"No key with id '{_shown(key_id)}'.", param="key_id")
        key = await self.gw.keys.store.get(key_id)
        if key is None:
            for principal, _ in self.gw.snap.keyring.entries():
                if principal.key_id == key_id:
                    self._tenant(principal.tenant, admin)
                    raise Conflict(
                        f"Key '{key_id}' is in the config; change it there (and reload).",
                        code="key_in_config",
                    )
            raise NotFound(f"No key with id '{_shown(key_id)}'.", param="key_id")
        self._tenant(key.tenant, admin)
        return key

    async def _used(self) -> dict[str, float]:
        """When each key was last used: the store's, and this replica's newer ones."""
        used = await self.gw.keys.store.last_used()
        for key_id, (_, at) in self.gw.keys.used.items():
            used[key_id] = max(at, used.get(key_id, 0.0))
        return used

    async def _all(self) -> list[dict[str, Any]]:
        """Every key, config and runtime, as the API shows them (no secrets, no hashes)."""
        used = await self._used()
        rows: list[dict[str, Any]] = []
        for principal, expires in self.gw.snap.keyring.entries():
            rows.append(
                {
                    "id": principal.key_id,
                    "tenant": principal.tenant,
                    "name": principal.key_id,
                    "created_at": None,
                    "expires_at": rfc3339(expires.timestamp()) if expires else None,
                    "last_used_at": rfc3339(used.get(principal.key_id)),
                    "source": "config",
                    "metadata": {},
                }
            )
        for key in sorted(await self.gw.keys.store.all(), key=lambda k: k.created_at):
            rows.append(self._view(key, used.get(key.id)))
        return rows

    @staticmethod
    def _view(key: ApiKey, last_used: float | None = None) -> dict[str, Any]:
        return {
            "id": key.id,
            "tenant": key.tenant,
            "name": key.name,
            "created_at": rfc3339(key.created_at),
            "expires_at": rfc3339(key.expires_at),
            "last_used_at": rfc3339(last_used),
            "source": "api",
            "metadata": key.metadata,
        }

    async def _audit(self, admin: Admin, event: str, key: ApiKey | None, **extra: Any) -> None:
        """The action's audit record, durable before the change is made."""
        fields = {"actor": admin.id}
        if key is not None:
            fields.update(tenant=key.tenant, key_id=key.id, name=key.name)
        await self.gw.audit.event(event, {**fields, **extra}, required=True)


async def _json(request: Request, allow_empty: bool = False) -> dict[str, Any]:
    raw = await read_body(request.receive, MAX_BODY, 30.0, request.headers.get("content-length"))
    if not raw.strip() and allow_empty:
        return {}
    value = parse_json(raw, 16)
    if not isinstance(value, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_json")
    return value


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise BadRequest(
            "'metadata' must be an object of at most 16 string values (keys up to 64, values "
            "up to 512 characters).",
            param="metadata",
        )
    return dict(value)


def _shown(value: str) -> str:
    return value[:64].encode("unicode_escape").decode("ascii")


def _json_response(body: Any, status: int = 200) -> Response:
    return Response(dump_json(body), status, media_type="application/json")
