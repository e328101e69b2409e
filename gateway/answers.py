"""The response hook: steps 10-12 for whatever answer comes back, on every transport.

An HTTP JSON body, the events of an SSE stream, the frames of a Responses socket and the
response events of a Realtime socket tell the gateway the same few things: an object was
created (bind it to the tenant and resource before the client can name it), an MCP item
went by (audit it), the response ended with its usage (settle tokens, cost, ledger and
metrics once). Each transport hands what it reads to the ``Answer`` of the exchange;
none binds, audits or settles on its own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .exchange import Exchange
from .lifecycle import finish
from .objects import output_containers
from .sse import FINAL_TYPES, Event, SseTap
from .validate import parse_upstream

if TYPE_CHECKING:
    from .objects import Keeper
    from .runtime import Gateway

# Where a Realtime response ends (its events carry the same ids and items otherwise).
REALTIME_FINAL = frozenset({"response.done"})


class Answer:
    """What one exchange's answer tells the gateway, read as it passes."""

    __slots__ = ("_api", "_bound", "_tap", "ex", "gw", "keeper")

    def __init__(
        self, gw: Gateway, ex: Exchange, keeper: Keeper | None, api: str | None = None
    ) -> None:
        self.gw = gw
        self.ex = ex
        self.keeper = keeper  # None: the answer creates nothing the gateway binds
        self._api = api or ex.api
        self._tap: SseTap | None = None
        self._bound = False  # the response id (once seen) is bound

    @property
    def tap(self) -> SseTap:
        """The reader of the answer's events (made on first use: JSON answers need none)."""
        if self._tap is None:
            kind = self._api
            finals = REALTIME_FINAL if kind == "realtime" else FINAL_TYPES
            on_event = self._on_event if self.gw.audit.enabled else None
            self._tap = SseTap(on_event, "responses" if kind == "realtime" else kind, finals)
        return self._tap

    # -- events: SSE (fed as bytes to ``tap``) and socket frames (``event``) ----------

    def event(self, event: Event) -> None:
        """One decoded event of a socket."""
        self.tap.observe(event)

    def frame(self, text: str | bytes) -> Event | None:
        """One socket frame: decoded and read (None: not a JSON object)."""
        event = parse_upstream(text.encode() if isinstance(text, str) else text)
        if not isinstance(event, dict):
            return None
        self.tap.observe(event)
        return event

    def _on_event(self, event: Event) -> None:
        ex = self.ex
        if ex.response_id is None:
            ex.response_id = self.tap.response_id
        ex.pending_audit += self.gw.audit.stream_records(ex, event)

    def has_work(self) -> bool:
        """Whether something must be done before the bytes just read go on: the response
        id bound (a client may name it at once), MCP records written first."""
        tap = self._tap  # one call per upstream read on a stream: no property, no tap made
        return (not self._bound and tap is not None and tap.response_id is not None) or bool(
            self.ex.pending_audit
        )

    async def work(self) -> None:
        """Bind the response id once seen; write the MCP records seen so far."""
        tap = self._tap
        if not self._bound and tap is not None and tap.response_id is not None:
            self._bound = True
            if self.ex.response_id is None:
                self.ex.response_id = tap.response_id
            if self.keeper is not None and self.keeper.creates == "response":
                await self.keeper.bind("response", tap.response_id)
        if self.ex.pending_audit:
            await self._flush_audit()

    async def ended(self) -> None:
        """The stream or response ended: its usage, the containers its output ran in,
        the MCP records not written yet."""
        tap, ex = self.tap, self.ex
        tap.close()
        ex.stream_events = max(ex.stream_events, tap.events)
        if tap.usage is not None:
            ex.usage = tap.usage
        await self.work()
        output = tap.final_output
        if output is not None and self.keeper is not None and self.keeper.creates == "response":
            for kind, object_id in output_containers(output):
                await self.keeper.bind(kind, object_id)

    async def _flush_audit(self) -> None:
        records, self.ex.pending_audit = self.ex.pending_audit, []
        await self.gw.audit.write(self.ex, records, before_forward=False)

    # -- a whole JSON answer -----------------------------------------------------------

    async def body(self, raw: bytes, content_type: str) -> bytes:
        """A successful JSON answer: usage, the ids it creates or deletes, the items of a
        list the tenant may see, its MCP items, a batch's files. The bytes to send."""
        ex, gw, keeper = self.ex, self.gw, self.keeper
        if keeper is not None and keeper.deleted is not None:
            await keeper.forget()
            return raw
        if "json" not in content_type:
            return raw
        body = parse_upstream(raw)
        if not isinstance(body, dict):
            return raw
        if isinstance(body.get("usage"), dict):
            ex.usage = body["usage"]
        if keeper is not None:
            await keeper.created(body)
            if keeper.lists is not None:
                raw = await keeper.only_mine(body) or raw
        if ex.operation.startswith("batches."):
            await gw.batches.observe(ex, body)
        if gw.audit.enabled and isinstance(body.get("output"), list):
            records = gw.audit.response_records(ex, body["output"])
            await gw.audit.write(ex, records, before_forward=False)
        return raw

    # -- the end of an exchange a socket owns ------------------------------------------

    async def settle(self, ok: bool) -> None:
        """A socket's response ended (its final frame read): settle it once. The HTTP
        owner, ``lifecycle.Operation``, settles its own exchanges."""
        try:
            await self.ended()
        finally:
            ex = self.ex
            if ex.upstream_seconds is None:
                ex.upstream_seconds = time.perf_counter() - (ex.upstream_started or ex.started)
            ex.status = ex.status or (200 if ok else 400)
            ex.upstream_status = ex.upstream_status or 200
            await finish(self.gw, ex)
