"""Hot reload: on SIGHUP or when the config file changes, validate and swap atomically.

Keys, tenants, models, resources and policies take effect on the next request;
in-flight requests keep the snapshot they started with. The credential, state
backend, audit sinks, upstream pool and metrics port are built once: a change to
those sections is logged as needing a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config
from .runtime import Gateway
from .server import on_signal

log = logging.getLogger("gateway.reload")
_RESTART_SECTIONS = ("credential", "state", "audit", "upstream", "metrics")


class Reloader:
    """Watches one config file for the life of the app."""

    def __init__(
        self,
        gateway: Gateway,
        path: str,
        interval: float,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.path = Path(path)
        self.interval = interval
        self._on_result = on_result
        self._digest = self._read_digest()
        self._wake = asyncio.Event()

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def trigger(self) -> None:
        """Ask for a reload now (the SIGHUP handler)."""
        self._wake.set()

    async def check(self, force: bool = False) -> str:
        """Reload if the file changed (or ``force``): 'unchanged', 'applied' or 'rejected'.

        Both outcomes are records in the audit chain (``config.reloaded`` with what was
        added and removed, ``config.rejected`` with the reason); ``actor`` says what asked.
        """
        actor = "sighup" if force else "file_change"
        digest = self._read_digest()
        if digest == self._digest and not force:
            return "unchanged"
        self._digest = digest
        try:
            loaded = load_config(self.path)
        except ConfigError as exc:
            log.error(
                "config reload rejected; keeping the running config", extra={"reason": str(exc)}
            )
            self._result("rejected")
            await self._audit("config.rejected", actor=actor, reason=str(exc)[:2000])
            return "rejected"
        old = self.gateway.snap.loaded.config
        stale = [s for s in _RESTART_SECTIONS if getattr(old, s) != getattr(loaded.config, s)]
        if stale:
            log.warning(
                "config sections changed that apply only after a restart", extra={"sections": stale}
            )
        self.gateway.swap(loaded)
        self.interval = loaded.config.server.reload_interval_seconds  # applies from now on
        log.info("config reloaded", extra={"source": str(self.path)})
        self._result("applied")
        await self._audit("config.reloaded", actor=actor, **changes(old, loaded.config))
        return "applied"

    async def _audit(self, event: str, **fields: Any) -> None:
        try:
            await self.gateway.audit.event(event, fields, required=False)
        except Exception:  # the reload stands; the sink's failure is logged and counted
            log.exception("could not write the reload's audit record")

    def _result(self, result: str) -> None:
        if self._on_result:
            self._on_result(result)

    async def run(self) -> None:
        """Poll every ``interval`` seconds (0: only on SIGHUP) until cancelled."""
        undo = on_signal(signal.SIGHUP, self.trigger)
        if undo is None:
            log.info("SIGHUP reload unavailable here (not the main thread)")
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.interval or None)
                    forced = True
                except TimeoutError:
                    forced = False
                self._wake.clear()
                await self.check(force=forced)
        finally:
            if undo is not None:
                undo()


def changes(old: Config, new: Config) -> dict[str, Any]:
    """What a reload changes: tenants, keys (ids), models and resources added and removed,
    and every changed leaf (``tenants.team-a.models``, ``…quotas.tokens_per_minute``)
    with its old and new value. Key hashes and admin credentials appear by id only."""

    def keys(cfg: Config) -> set[str]:
        return {f"{t}/{k.id}" for t, tc in cfg.tenants.items() for k in tc.keys}

    out: dict[str, Any] = {}
    for name, before, after in (
        ("tenants", set(old.tenants), set(new.tenants)),
        ("keys", keys(old), keys(new)),
        ("models", set(old.models), set(new.models)),
        ("resources", set(old.resources), set(new.resources)),
    ):
        out[f"{name}_added"] = sorted(after - before)
        out[f"{name}_removed"] = sorted(before - after)
    out["changed"] = [
        {"path": path, "from": a, "to": b} for path, a, b in _diff(_plain(old), _plain(new), "")
    ]
    return out


def _plain(cfg: Config) -> Any:
    """The config as JSON values, credentials by id: a key's hash never goes in a record."""
    data = cfg.model_dump(mode="json")
    for tenant in data["tenants"].values():
        tenant["keys"] = [k["id"] for k in tenant["keys"]]
    admin = data["admin"]
    admin["key_sha256"] = "set" if admin["key_sha256"] else None
    admin["keys"] = {k["id"]: k["tenants"] for k in admin["keys"]}
    return data


def _diff(a: Any, b: Any, path: str) -> list[tuple[str, Any, Any]]:
    """Changed leaves between two JSON values (a list is one leaf: its old and new value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in list(a) + [k for k in b if k not in a]:
            here = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append((here, a.get(key), b.get(key)))
            else:
                out += _diff(a[key], b[key], here)
        return out
    return [] if a == b else [(path, a, b)]
