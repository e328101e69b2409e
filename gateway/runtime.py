"""The gateway's long-lived parts, and the config snapshot they serve with."""

from __future__ import annotations

import logging
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any, NamedTuple

from .admission import QuotaGate
from .apikeys import ApiKeys
from .audit import Auditor
from .breaker import Breakers
from .config import LoadedConfig
from .credentials import TokenProvider
from .errors import UpstreamUnavailable
from .exchange import Observer
from .keys import KeyRing
from .routing import Router
from .state import StateBackend
from .upstream import UpstreamClient

log = logging.getLogger("gateway")


class Snapshot(NamedTuple):
    """Everything derived from one config; swapped whole on reload."""

    loaded: LoadedConfig
    keyring: KeyRing
    router: Router
    trusted: tuple[IPv4Network | IPv6Network, ...]


def snapshot(loaded: LoadedConfig) -> Snapshot:
    """Derive the lookup structures of one config."""
    trusted = tuple(ip_network(c, strict=False) for c in loaded.config.server.trusted_proxies)
    return Snapshot(loaded, KeyRing(loaded.config), Router(loaded.config), trusted)


def client_address(peer: str | None, forwarded_for: str | None, snap: Snapshot) -> str | None:
    """The client's address: from X-Forwarded-For only when the peer is a trusted proxy."""
    if peer is None or not snap.trusted or not forwarded_for:
        return peer

    def trusted(addr: str) -> bool:
        try:
            ip = ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in snap.trusted)

    if not trusted(peer):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not trusted(hop):
            return hop
    return hops[0] if hops else peer


class Gateway:
    """Shared clients plus the current config snapshot."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        http: UpstreamClient,
        state: StateBackend,
        tokens: TokenProvider | None,
        observers: list[Observer],
        gate: QuotaGate,
        audit: Auditor,
        breakers: Breakers,
        keys: ApiKeys,
    ) -> None:
        self.snap = snapshot(loaded)
        self.http = http
        self.state = state
        self.state_is_local = bool(getattr(state, "local", False))
        self.tokens = tokens
        self.observers = observers
        self.gate = gate
        self.audit = audit
        self.breakers = breakers
        self.keys = keys
        self.draining = False
        self.loop_lag = 0.0  # seconds, measured by app._measure_loop_lag
        self.sockets: set[Any] = set()  # open client WebSockets (websocket.Socket)
        from .batches import BatchDesk

        self.batches = BatchDesk(self)
        from .guardrails import Guard

        self.guard: Guard | None = None  # set by the app (Content Safety checks)

    def swap(self, loaded: LoadedConfig) -> None:
        """Serve new requests with ``loaded`` (an attribute swap: atomic for readers)."""
        self.snap = snapshot(loaded)

    async def auth_header(self, snap: Snapshot, resource: str) -> tuple[str, str]:
        """The credential header for ``resource``: its api-key or an Entra bearer token."""
        res = snap.loaded.config.resources.get(resource)
        if res is None:
            raise UpstreamUnavailable(
                "The resource of this request is no longer configured.", code="resource_removed"
            )
        if res.auth == "api_key":
            return ("api-key", snap.loaded.resource_keys[resource].value)
        assert self.tokens is not None
        return ("authorization", "Bearer " + await self.tokens.token(res.scope))
