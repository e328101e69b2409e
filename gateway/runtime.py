"""The gateway's long-lived parts, and the config snapshot they serve with."""

from __future__ import annotations

import logging
from typing import NamedTuple

import httpx

from .admission import QuotaGate
from .config import LoadedConfig
from .credentials import TokenProvider
from .errors import UpstreamUnavailable
from .exchange import Observer
from .keys import KeyRing
from .routing import Router
from .state import StateBackend

log = logging.getLogger("gateway")


class Snapshot(NamedTuple):
    """Everything derived from one config; swapped whole on reload."""

    loaded: LoadedConfig
    keyring: KeyRing
    router: Router


def snapshot(loaded: LoadedConfig) -> Snapshot:
    """Derive the lookup structures of one config."""
    return Snapshot(loaded, KeyRing(loaded.config), Router(loaded.config))


class Gateway:
    """Shared clients plus the current config snapshot."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        http: httpx.AsyncClient,
        state: StateBackend,
        tokens: TokenProvider | None,
        observers: list[Observer],
        gate: QuotaGate,
    ) -> None:
        self.snap = snapshot(loaded)
        self.http = http
        self.state = state
        self.tokens = tokens
        self.observers = observers
        self.gate = gate
        self.draining = False

    def swap(self, loaded: LoadedConfig) -> None:
        """Serve new requests with ``loaded`` (an attribute swap: atomic for readers)."""
        self.snap = snapshot(loaded)

    async def auth_header(self, snap: Snapshot, resource: str) -> tuple[str, str]:
        """The credential header for ``resource``: its api-key or an Entra bearer token."""
        res = snap.loaded.config.resources.get(resource)
        if res is None:
            raise UpstreamUnavailable(
                f"Resource '{resource}' is no longer configured.", code="resource_removed"
            )
        if res.auth == "api_key":
            return ("api-key", snap.loaded.resource_keys[resource].value)
        assert self.tokens is not None
        return ("authorization", "Bearer " + await self.tokens.token(res.scope))
