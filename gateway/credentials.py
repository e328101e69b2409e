"""Microsoft Entra tokens for upstream resources, cached per scope and refreshed early.

azure-identity's synchronous credentials are used from a worker thread: a token
is fetched about once an hour per scope, so a thread hop costs nothing, and it
spares the gateway a second HTTP stack (the ``aio`` credentials need aiohttp).
One fetch per scope is in flight at a time; concurrent requests wait on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from .config import CredentialConfig, Secret
from .errors import CredentialError

log = logging.getLogger("gateway.credentials")

# A token this close to expiry is still served if a refresh fails.
_STILL_USABLE_SECONDS = 30.0


class _AccessToken(NamedTuple):
    token: str
    expires_on: float


class SyncCredential(Protocol):
    def get_token(self, *scopes: str) -> Any: ...


def build_credential(cfg: CredentialConfig, client_secret: Secret | None) -> SyncCredential:
    """The azure-identity credential that ``credential.type`` selects."""
    from azure import identity

    if cfg.type == "managed_identity":
        return identity.ManagedIdentityCredential(client_id=cfg.client_id)
    if cfg.type == "workload_identity":
        kwargs = {
            k: v
            for k, v in (
                ("tenant_id", cfg.tenant_id),
                ("client_id", cfg.client_id),
                ("token_file_path", cfg.token_file_path),
            )
            if v
        }
        return identity.WorkloadIdentityCredential(**kwargs)
    if cfg.type == "client_secret":
        assert cfg.tenant_id and cfg.client_id and client_secret is not None
        return identity.ClientSecretCredential(cfg.tenant_id, cfg.client_id, client_secret.value)
    if cfg.type == "azure_cli":
        return identity.AzureCliCredential()
    return identity.DefaultAzureCredential(
        managed_identity_client_id=cfg.client_id,
        exclude_interactive_browser_credential=True,
    )


class TokenProvider:
    """Bearer tokens per scope: cached, refreshed ``margin`` seconds before expiry."""

    def __init__(
        self,
        credential: SyncCredential,
        *,
        margin: float = 300.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        on_fetch: Callable[[bool], None] | None = None,
    ) -> None:
        self._credential = credential
        self._margin = margin
        self._timeout = timeout
        self._clock = clock
        self._on_fetch = on_fetch
        self._cache: dict[str, _AccessToken] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0

    def _fresh(self, scope: str) -> str | None:
        cached = self._cache.get(scope)
        if cached is not None and cached.expires_on - self._clock() > self._margin:
            return cached.token
        return None

    def has_usable_token(self) -> bool:
        """Whether some scope holds a token that is not about to expire (for readiness)."""
        now = self._clock()
        return any(t.expires_on - now > _STILL_USABLE_SECONDS for t in self._cache.values())

    async def token(self, scope: str) -> str:
        """A valid access token for ``scope``; raises ``CredentialError`` when none can be had."""
        token = self._fresh(scope)
        if token is not None:
            return token
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:
            token = self._fresh(scope)
            if token is not None:
                return token
            return await self._fetch(scope)

    async def _fetch(self, scope: str) -> str:
        self.fetches += 1
        try:
            raw = await asyncio.wait_for(
                asyncio.to_thread(self._credential.get_token, scope), self._timeout
            )
        except Exception as exc:
            if self._on_fetch:
                self._on_fetch(False)
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            log.warning("entra token fetch failed", extra={"scope": scope, "reason": reason})
            cached = self._cache.get(scope)
            if cached is not None and cached.expires_on - self._clock() > _STILL_USABLE_SECONDS:
                return cached.token
            raise CredentialError(
                "The gateway could not obtain a Microsoft Entra token for the upstream "
                f"resource ({reason}); its identity is unavailable or misconfigured."
            ) from exc
        if self._on_fetch:
            self._on_fetch(True)
        self._cache[scope] = _AccessToken(raw.token, float(raw.expires_on))
        return str(raw.token)

    def close(self) -> None:
        """Release the credential's resources."""
        close = getattr(self._credential, "close", None)
        if close is not None:
            close()
