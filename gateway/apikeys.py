"""Every key a replica accepts: the config's (``keys.KeyRing``) and those made through the
admin API (``state/keystore.py``), cached per replica.

The cache is refreshed when the store's version changes (polled every
``REFRESH_SECONDS``), so a revocation or rotation made on any replica holds on every
replica within about a second. A key the cache has not seen is looked up in the store
at once (a key made on another replica works there immediately); when the store cannot
be reached, such a key gets 503 ``state_unavailable``, never 401: a Redis blip must not
look like a revocation, and the keys already cached keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from datetime import datetime

from .errors import StateError
from .keys import KEY_PREFIX, KeyRing, Principal, digest_of, expired, invalid_key, required_key
from .state.keystore import ApiKey, KeyStore

log = logging.getLogger("gateway.apikeys")

REFRESH_SECONDS = 0.5
FLUSH_SECONDS = 30.0  # last-used times reach the store this often (coarse by design)
_MAX_MISSES = 10_000


class ApiKeys:
    """The replica's view of the runtime keys, and when each key was last used."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._by_hash: dict[str, ApiKey] = {}
        self._misses: set[str] = set()
        self._version = -1
        self.used: dict[str, tuple[str, float]] = {}  # key id -> (tenant, last use)
        self._unflushed: dict[str, float] = {}

    async def authenticate(
        self, headers: Iterable[tuple[bytes, bytes]], ring: KeyRing, now: datetime | None = None
    ) -> Principal:
        """The principal of the presented key (config keys first), or 401/503."""
        key = required_key(headers)
        digest = digest_of(key)
        principal = ring.lookup(digest, now)
        if principal is None:
            if not key.startswith(KEY_PREFIX):
                raise invalid_key()  # the API makes only gk- keys: no store round trip
            principal = await self._runtime(digest.hex(), now)
        at = time.time()
        self.used[principal.key_id] = (principal.tenant, at)
        self._unflushed[principal.key_id] = at
        return principal

    async def _runtime(self, sha: str, now: datetime | None) -> Principal:
        key = self._by_hash.get(sha)
        if key is None and sha not in self._misses:
            try:
                key = await self.store.by_hash(sha)
            except StateError as exc:
                raise StateError(
                    "The gateway cannot check this key right now (its key store is "
                    "unavailable); retry shortly.",
                    code="state_unavailable",
                ) from exc
            if key is None:
                if len(self._misses) >= _MAX_MISSES:
                    self._misses.clear()
                self._misses.add(sha)
            else:
                self._by_hash[sha] = key
        return _opens(key, sha, now.timestamp() if now is not None else time.time())

    def recheck(
        self, digest: bytes, principal: Principal, ring: KeyRing, tenants: Iterable[str]
    ) -> None:
        """Raise 401 unless the key behind ``principal`` (by its ``digest``) still opens
        it: not revoked, expired, past its rotation grace, nor its tenant removed. From
        the replica's cache and config only, no I/O: cheap enough for every frame of an
        open socket (the cache follows the key store within ``REFRESH_SECONDS``)."""
        found = ring.lookup(digest)  # a config key (raises for an expired one)
        if found is None:
            sha = digest.hex()
            found = _opens(self._by_hash.get(sha), sha, time.time())
        if found != principal or principal.tenant not in tenants:
            raise invalid_key()

    def forget(self, key: ApiKey) -> None:
        """Drop a key from this replica's cache at once (it was revoked or rotated here)."""
        for h, _ in key.hashes:
            self._by_hash.pop(h, None)

    async def refresh(self) -> None:
        """Reload the cache if the store changed since the last look."""
        version = await self.store.version()
        if version == self._version:
            return
        keys = await self.store.all()
        self._by_hash = {h: k for k in keys for h, _ in k.hashes}
        self._misses = set()
        self._version = version

    async def flush(self) -> None:
        """Write the last-used times gathered since the previous flush."""
        pending, self._unflushed = self._unflushed, {}
        try:
            await self.store.touch(pending)
        except StateError:
            for key_id, at in pending.items():  # keep them for the next flush
                self._unflushed.setdefault(key_id, at)

    async def run(self) -> None:
        """Refresh every ``REFRESH_SECONDS`` and flush every ``FLUSH_SECONDS`` until cancelled."""
        last_flush = time.monotonic()
        try:
            while True:
                try:
                    await self.refresh()
                except StateError as exc:
                    log.warning("key cache not refreshed", extra={"reason": exc.message})
                if time.monotonic() - last_flush >= FLUSH_SECONDS:
                    last_flush = time.monotonic()
                    await self.flush()
                await asyncio.sleep(REFRESH_SECONDS)
        finally:
            with contextlib.suppress(Exception):
                await self.flush()


def _opens(key: ApiKey | None, sha: str, at: float) -> Principal:
    """The principal a runtime key opens with the secret of hash ``sha`` at ``at``; 401
    for none (revoked, unknown), an old secret past its rotation grace, or an expired key."""
    if key is None or sha not in key.usable(at):
        raise invalid_key()
    if key.expires_at is not None and at >= key.expires_at:
        raise expired(key.id, datetime.fromtimestamp(key.expires_at).astimezone().isoformat())
    return Principal(key.tenant, key.id)
