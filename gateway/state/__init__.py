"""State backends: one interface, chosen by config (memory or Redis)."""

from __future__ import annotations

from typing import NamedTuple, Protocol


class Binding(NamedTuple):
    """Which tenant created a response, and on which resource it lives."""

    tenant: str
    resource: str


class StateBackend(Protocol):
    """What the gateway keeps between requests (and, with Redis, between replicas)."""

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        """Remember who owns ``response_id`` and where it lives, for ``ttl`` seconds."""

    async def get_binding(self, response_id: str) -> Binding | None:
        """The binding of ``response_id``, or None if unknown or expired."""

    async def delete_binding(self, response_id: str) -> None:
        """Forget ``response_id`` (after a successful delete)."""

    async def ping(self) -> None:
        """Raise ``StateError`` if the backend cannot be reached."""

    async def aclose(self) -> None:
        """Release connections."""
