"""One request through the gateway, and the observers that are told about it.

Observers (metrics, access log, audit) subscribe to a few typed hooks instead of
patching the handler.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .keys import Principal
from .quotas import Admission, QuotaScope, token_kinds
from .routing import Target


class _RequestIds:
    """Random request ids (128 bits from ``os.urandom``), 256 of them per system call.

    A forked child starts a pool of its own, so no two processes hand out the same ids.
    """

    __slots__ = ("_at", "_pool")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._pool, self._at = b"", 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(4096), 0
        self._at = at + 16
        return self._pool[at : at + 16].hex()


new_request_id = _RequestIds()


@dataclass(slots=True)
class Exchange:
    """What the gateway learned about one request while serving it."""

    request_id: str
    operation: str
    method: str
    client: str | None = None
    started: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    model: str | None = None
    target: Target | None = None
    stream: bool = False
    status: int = 0
    error_code: str | None = None
    upstream_status: int | None = None
    upstream_started: float | None = None
    upstream_seconds: float | None = None
    ttfb_seconds: float | None = None
    duration_seconds: float | None = None
    upstream_request_id: str | None = None
    response_id: str | None = None
    previous_response_id: str | None = None
    usage: dict[str, Any] | None = None
    attempts: int = 0
    interrupted: bool = False
    request_bytes: int = 0
    stream_events: int = 0
    quota_scopes: list[QuotaScope] = field(default_factory=list)
    admission: Admission | None = None
    quota_reason: str | None = None
    leased: bool = False
    estimated_tokens: int = 0
    stream_relayed: bool = False
    spillover: bool = False
    cost: float | None = None
    currency: str | None = None
    cost_estimated: bool = False
    budget_currency: str | None = None
    budget_warn_at: float = 0.8
    traceparent: str | None = None  # the client's, when it sent one
    traceparent_out: str | None = None  # ours, sent upstream (tracing on)
    span: Any = None
    audited_items: set[str] = field(default_factory=set)
    pending_audit: list[dict[str, Any]] = field(default_factory=list)
    _kinds: dict[str, int] | None = field(default=None, repr=False)
    _kinds_of: dict[str, Any] | None = field(default=None, repr=False)
    api: str = "other"  # the endpoint's api (routes.Api): body checks, stream framing
    pinned: str | None = None  # the resource of the stored objects the request names
    path: str | None = None  # only for unknown paths, for the access log
    transport: str = "http"  # "websocket" for a WebSocket handshake
    actor: str | None = None  # the admin behind an admin request

    def usage_kinds(self) -> dict[str, int] | None:
        """Input, cached, output and reasoning counts of ``usage``, worked out once for
        the quota, the price, the ledger, the metrics, the span and the access line."""
        if not self.usage:
            return None
        if self._kinds_of is not self.usage:
            self._kinds, self._kinds_of = token_kinds(self.usage), self.usage
        return self._kinds

    @property
    def tenant(self) -> str | None:
        return self.principal.tenant if self.principal else None

    def who_and_where(self) -> dict[str, Any]:
        """Request id, caller and target fields shared by the access log and audit records."""
        t = self.target
        return {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "key_id": self.principal.key_id if self.principal else None,
            "model": self.model,
            "deployment": t.deployment if t and t.deployment else None,
            "resource": t.resource if t else None,
            "region": t.region if t else None,
        }


class Observer(Protocol):
    """Hooks an observer may implement; each is called synchronously and must be cheap."""

    def started(self, ex: Exchange) -> None: ...

    def stream_started(self, ex: Exchange) -> None: ...

    def upstream_failed(self, ex: Exchange, target: Target, status: int | None) -> None: ...

    def stale_read(self, ex: Exchange, target: Target) -> None: ...

    def finished(self, ex: Exchange) -> None: ...

    def socket_opened(self, ex: Exchange) -> None: ...

    def socket_closed(self, ex: Exchange) -> None: ...

    def socket_frame(self, ex: Exchange, direction: str, size: int) -> None: ...


class BaseObserver:
    """No-op implementations of every hook."""

    def started(self, ex: Exchange) -> None:
        return None

    def stream_started(self, ex: Exchange) -> None:
        return None

    def upstream_failed(self, ex: Exchange, target: Target, status: int | None) -> None:
        return None

    def stale_read(self, ex: Exchange, target: Target) -> None:
        return None

    def finished(self, ex: Exchange) -> None:
        return None

    def socket_opened(self, ex: Exchange) -> None:
        return None

    def socket_closed(self, ex: Exchange) -> None:
        return None

    def socket_frame(self, ex: Exchange, direction: str, size: int) -> None:
        return None
