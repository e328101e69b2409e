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

    def lookup(self, digest: bytes, now: datetime | None = None) -> Principal | None:
        """The principal of a config key by its SHA-256 digest (None: not a config key);
        raises ``Unauthenticated`` for an expired one."""
        entry = self._by_hash.get(digest.hex())
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        if entry.expires_at is not None and (now or datetime.now(UTC)) >= entry.expires_at:
            raise expired(entry.principal.key_id, entry.expires_at.isoformat())
        return entry.principal

    def entries(self) -> list[tuple[Principal, datetime | None]]:
        """Every config key: who it is, and when it expires."""
        return [(e.principal, e.expires_at) for e in self._by_hash.values()]

    def authenticate(
        self, headers: Iterable[tuple[bytes, bytes]], now: datetime | None = None
    ) -> Principal:
        """Map the presented key to its principal, or raise ``Unauthenticated``."""
        principal = self.lookup(digest_of(required_key(headers)), now)
        if principal is None:
            raise invalid_key()
        return principal


def required_key(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The presented key, or a 401 saying how to send one."""
    key = presented_key(headers)
    if key is None:
        raise Unauthenticated(
            "No gateway key provided. Send it as 'api-key: KEY' or 'Authorization: Bearer KEY'.",
            code="missing_api_key",
        )
    return key


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def invalid_key() -> Unauthenticated:
    return Unauthenticated("Invalid gateway key.", code="invalid_api_key")


def expired(key_id: str, when: str) -> Unauthenticated:
    return Unauthenticated(
        f"Gateway key '{key_id}' expired at {when}; ask your platform team for a new one.",
        code="expired_api_key",
    )
