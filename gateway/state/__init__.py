"""State backends: one interface, chosen by config (sqlite, memory or Redis)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

from ..quotas import MICRO

if TYPE_CHECKING:
    from ..quotas import Admission, QuotaScope, Windows


class Binding(NamedTuple):
    """Which tenant created a stored object, on which resource it lives, for which model,
    and what it is (``response``, ``file``…; empty in bindings written before kinds)."""

    tenant: str
    resource: str
    model: str = ""
    kind: str = ""


class Settled(NamedTuple):
    """What a settle did: whether it charged, and each scope's money spent after it
    (today, this month; millionths of the currency), for budget warnings."""

    charged: bool
    spent: tuple[tuple[int, int], ...] = ()


class LedgerEntry(NamedTuple):
    """One billed exchange for the usage ledger (tenant x model x UTC day)."""

    tenant: str
    model: str
    resource: str
    input: int
    cached: int
    output: int
    reasoning: int
    cost: int  # millionths of the price's currency
    estimated: bool
    ttl: float  # how long the day's row is kept

    @classmethod
    def of(
        cls,
        tenant: str,
        model: str,
        resource: str,
        kinds: dict[str, int],
        cost: float,
        estimated: bool,
        retention_days: float,
    ) -> LedgerEntry:
        """The entry of token ``kinds`` and ``cost`` (in the currency's units)."""
        return cls(
            tenant,
            model,
            resource,
            kinds["input"],
            kinds["cached"],
            kinds["output"],
            kinds["reasoning"],
            round(cost * MICRO),
            estimated,
            retention_days * 86400.0,
        )


LEDGER_FIELDS = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_micro",
    "estimated_requests",
    "estimated_cost_micro",
)


def ledger_increments(e: LedgerEntry) -> dict[str, int]:
    """The ledger fields one exchange adds."""
    return {
        "requests": 1,
        "input_tokens": e.input,
        "cached_tokens": e.cached,
        "output_tokens": e.output,
        "reasoning_tokens": e.reasoning,
        "cost_micro": e.cost,
        "estimated_requests": int(e.estimated),
        "estimated_cost_micro": e.cost if e.estimated else 0,
    }


class LedgerReader(Protocol):
    """What reads the usage ledger: every backend, and the state file read from outside."""

    async def usage(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        """The ledger of ``tenant`` for UTC ``day`` (YYYYMMDD): (model, resource) -> field -> n."""


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
        ledger: LedgerEntry | None = None,
    ) -> Settled:
        """Give back ``lease`` (if any), charge ``tokens`` and ``cost`` (millionths of the
        budget's currency) to every scope, and add ``ledger`` to the usage ledger: one step.

        With ``once``, the charge and the ledger entry happen only the first time for that id.
        """

    async def usage(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        """The ledger of ``tenant`` for UTC ``day`` (YYYYMMDD): (model, resource) -> field -> n."""

    async def charged(self, tenant: str, once: str) -> bool:
        """Whether a settle with the charge-once marker ``once`` has charged already."""

    async def batch_open(self, batch_id: str) -> None:
        """Register a batch for the watcher (until ``batch_done``)."""

    async def batch_done(self, batch_id: str) -> None:
        """A batch reached a terminal status: the watcher stops looking at it."""

    async def open_batches(self) -> list[str]:
        """The registered batches not yet done."""

    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or keep the lease ``name`` for ``holder`` for ``ttl`` seconds; False when
        another holder has it."""

    async def ping(self) -> None:
        """Raise ``StateError`` if the backend cannot be reached."""

    async def aclose(self) -> None:
        """Release connections."""
