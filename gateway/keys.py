"""Gateway keys: generation, hashing, and lookup of an inbound key by its hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import NamedTuple

from .config import Config
from .errors import Unauthenticated

KEY_PREFIX = "gk-"


class Principal(NamedTuple):
    """Who is calling: the tenant and the id of the key used (never the key)."""

    tenant: str
    key_id: str


class _Entry(NamedTuple):
    digest: bytes
    principal: Principal
    expires_at: datetime | None


def new_key() -> str:
    """A fresh gateway key: ``gk-`` and 256 bits of randomness, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as stored in the config."""
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a client sent as ``api-key:`` or ``Authorization: Bearer`` (raw ASGI headers).

    Every copy of both headers is read: two different keys in one request are refused
    (401 ``ambiguous_credentials``), since a proxy in between might pick either.
    """
    found: set[str] = set()
    for name, raw in headers:
        if name == b"api-key":
            value = raw.decode("latin-1").strip()
            if value:
                found.add(value)
        elif name == b"authorization":
            scheme, _, value = raw.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                found.add(value.strip())
    if len(found) > 1:
        raise Unauthenticated(
            "The request carries more than one credential (api-key and Authorization, or "
            "either twice) with different keys; send exactly one.",
            code="ambiguous_credentials",
        )
    return found.pop() if found else None


class KeyRing:
    """All configured keys, indexed by hash."""

    def __init__(self, config: Config) -> None:
        self._by_hash: dict[str, _Entry] = {}
        for tenant, tcfg in config.tenants.items():
            for k in tcfg.keys:
                entry = _Entry(bytes.fromhex(k.sha256), Principal(tenant, k.id), k.expires_at)
                self._by_hash[k.sha256] = entry

    def authenticate(
        self, headers: Iterable[tuple[bytes, bytes]], now: datetime | None = None
    ) -> Principal:
        """Map the presented key to its principal, or raise ``Unauthenticated``."""
        key = presented_key(headers)
        if key is None:
            raise Unauthenticated(
                "No gateway key provided. "
                "Send it as 'api-key: KEY' or 'Authorization: Bearer KEY'.",
                code="missing_api_key",
            )
        digest = hashlib.sha256(key.encode()).digest()
        entry = self._by_hash.get(digest.hex())
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise Unauthenticated("Invalid gateway key.", code="invalid_api_key")
        if entry.expires_at is not None and (now or datetime.now(UTC)) >= entry.expires_at:
            raise Unauthenticated(
                f"Gateway key '{entry.principal.key_id}' expired at "
                f"{entry.expires_at.isoformat()}; ask your platform team for a new one.",
                code="expired_api_key",
            )
        return entry.principal
