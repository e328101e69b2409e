"""State backends: one interface, chosen by config (memory or Redis)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from ..quotas import Admission, QuotaScope, Windows


class Binding(NamedTuple):
    """Which tenant created a response, on which resource it lives, for which model."""

    tenant: str
    resource: str
    model: str = ""


class Settled(NamedTuple):
    """What a settle did: whether it charged, and each scope's money spent after it
    (today, this month; millionths of the currency), for budget warnings."""

    charged: bool
    spent: tuple[tuple[int, int], ...] = ()


class StateBackend(Protocol):
    """What the gateway keeps between requests (and, with Redis, between replicas)."""

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        """Remember who owns ``response_id`` and where it lives, for ``ttl`` seconds."""

    async def get_binding(self, response_id: str) -> Binding | None:
        """The binding of ``response_id``, or None if unknown or expired."""

    async def delete_binding(self, response_id: str) -> None:
        """Forget ``response_id`` (after a successful delete)."""

    async def admit(
        self, scopes: list[QuotaScope], lease: str, lease_ttl: float, w: Windows
    ) -> Admission:
        """Check every scope and, only if all pass, take a request and a lease (atomic)."""

    async def settle(
        self,
        scopes: list[QuotaScope],
        lease: str | None,
        tokens: int,
        w: Windows,
        once: str | None,
        ttl: float,
        cost: int = 0,
    ) -> Settled:
        """Give back ``lease`` (if any) and charge ``tokens`` and ``cost`` (millionths of the
        budget's currency) to every scope, in one step.

        With ``once``, they are charged only the first time for that id.
        """

    async def ping(self) -> None:
        """Raise ``StateError`` if the backend cannot be reached."""

    async def aclose(self) -> None:
        """Release connections."""
