"""Realtime over WebSocket: ``/openai/v1/realtime?model=…`` and
``/openai/realtime?api-version=…&deployment=…``, with every rule HTTP has.

The handshake: the key in a header, the ``api-key`` query parameter or the browser's
``openai-insecure-api-key.KEY`` subprotocol (never logged: uvicorn's handshake lines,
which carry the query, are dropped; the gateway's access line has no query); the query
parsed strictly (``model`` or ``deployment``, ``api-version``, ``intent=transcription``;
anything else, or anything twice → 400). The logical model is checked against the
tenant's allowlist and regions and the upstream URL is built with its deployment and the
checked parameters only; the upstream socket opens at the handshake with the gateway's
credential, and the connection holds one concurrency slot.

Client events: only the types Azure documents (``CLIENT_EVENTS``; another → an ``error``
event ``unknown_event_type``, nothing upstream), each parsed strictly and passed whole
through the rulebook (``checks``): every id by shape, keys that differ only by case,
every tool list (types, MCP servers, connectors and tunnels, the approval rewrite), every
model it names (a session's, a transcription model, a tool's) mapped to a deployment on
the session's resource, its MCP tools and approvals audited before it goes up as the
gateway's serialisation. A ``response.create`` is admitted against the tenant's rate,
token and money limits. A response the upstream starts by itself (server VAD ends a
turn) is admitted when its ``response.created`` arrives; refused, the gateway cancels it
upstream, drops its events, sends the client an ``error`` event with the refusal, and
settles what it used. ``response.done`` settles each response (tokens, cost, ledger,
metrics, an access line) through the response hook.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from .answers import Answer
from .checks import Request, check, tenant_of
from .errors import BadRequest, GatewayError, Unauthenticated
from .objects import Refs
from .routes import PREVIEW, V1
from .validate import dump_json, parse_json, parse_upstream
from .websocket import Socket, frame_error

REALTIME_PATHS = {V1 + "/realtime": V1, PREVIEW + "/realtime": PREVIEW}
# The client events Azure documents (GA, and the preview's transcription sessions).
CLIENT_EVENTS = frozenset(
    {
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "conversation.item.create",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "conversation.item.delete",
        "response.create",
        "response.cancel",
        "output_audio_buffer.clear",
        "transcription_session.update",
    }
)
# Realtime's words under id keys (``conversation: "auto" | "none"``), never ids.
_WORDS = frozenset({"auto", "none"})
_INTENTS = frozenset({"transcription"})


class RealtimeSocket(Socket):
    """One client connection to the Realtime API."""

    operation = "realtime.socket"
    api = "realtime"
    keys_in_url = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.preview = REALTIME_PATHS[self.scope["path"]] == PREVIEW
        self.creates: deque[tuple[str, Answer]] = deque()  # admitted, awaiting response.created
        self.active: dict[str, Answer] = {}  # response id -> its hook, until response.done
        self.suppressed: dict[str, Answer] = {}  # refused responses the upstream started
        self.suppressed_items: set[str] = set()  # their output items
        self._event_id: Any = None
        self._named = 0  # event ids the gateway gave response.create events without one

    def allowed_params(self) -> frozenset[str]:
        name = "deployment" if self.preview else "model"
        return frozenset({name, "api-version", "intent", "api-key"})

    async def before_accept(self) -> None:
        name = "deployment" if self.preview else "model"
        model = self.params.get(name)
        if not model:
            raise BadRequest(f"Missing required query parameter '{name}'.", param=name)
        if self.preview and not self.params.get("api-version"):
            raise BadRequest(
                "The /openai/realtime form needs its api-version query parameter.",
                code="missing_api_version",
                param="api-version",
            )
        intent = self.params.get("intent")
        if intent is not None and intent not in _INTENTS:
            raise BadRequest(
                "'intent' may only be 'transcription'.", code="invalid_value", param="intent"
            )
        self.conn.model = model

    async def open_at_handshake(self) -> None:
        principal, snap = self.principal, self.snap
        assert principal is not None and self.conn.model is not None
        tenant = tenant_of(snap, principal)
        targets = snap.router.targets(principal.tenant, tenant, self.conn.model, None)
        name = "deployment" if self.preview else "model"
        path = (PREVIEW if self.preview else V1) + "/realtime"
        for target in targets:
            query = {k: v for k, v in self.params.items() if k in ("api-version", "intent")}
            query[name] = target.deployment
            try:
                await self._connect(target, path, query)
                return
            except GatewayError:
                if target is targets[-1]:
                    raise

    async def _serve(self) -> None:
        assert self.upstream is not None
        reader = asyncio.ensure_future(self._relay())
        try:
            while not reader.done():
                text = await self._client_text()
                if text is None:
                    return
                self._event_id = None
                try:
                    out = await self._event(text)
                except GatewayError as exc:
                    await self._send_text(frame_error(exc, self._event_id))
                    continue
                await self.upstream.send_str(out)
        finally:
            self.closed = True
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _event(self, text: str) -> str:
        """A client event through the rulebook: what to send upstream (raises for an
        ``error`` event; nothing goes up then)."""
        gw, snap = self.gw, self.snap
        assert self.principal is not None
        event = parse_json(text.encode(), snap.loaded.config.server.max_json_depth)
        if not isinstance(event, dict):
            raise BadRequest("A client event must be a JSON object.", code="invalid_event")
        self._event_id = event.get("event_id")
        kind = event.get("type")
        if kind not in CLIENT_EVENTS:
            shown = str(kind)[:64].encode("unicode_escape").decode()
            raise BadRequest(
                f"Unknown client event type '{shown}'; this socket takes: "
                f"{', '.join(sorted(CLIENT_EVENTS))}.",
                code="unknown_event_type",
                param="type",
            )
        asks = kind == "response.create"
        if asks and not isinstance(self._event_id, str):
            # Named, so an error event about it (error.event_id) is told apart.
            self._named += 1
            self._event_id = event["event_id"] = f"evt_gw{self.conn.request_id[:16]}_{self._named}"
        request = Request(
            api="realtime",
            body=event,
            refs=Refs(words=_WORDS),
            route="session",
            target=self.target,
            operation=str(kind),
        )
        checked = await check(gw, snap, self.principal, request)
        ex = self.response(self.conn.model, len(text))
        await self.admitted(ex, checked, "rate" if asks else None)
        if asks:
            for obs in gw.observers:
                obs.started(ex)
            answer = Answer(gw, ex, None, "realtime")
            self.creates.append((str(self._event_id), answer))
            self.pending.append(answer)
        payload = checked.plans[0].payload
        assert payload is not None
        return payload.decode()

    async def _seen(self, text: str) -> bool:
        """A server frame: the response it belongs to hears it (admitted when the upstream
        started it, settled at its end); a refused response's frames do not go on."""
        if self.suppressed and any(rid in text for rid in self.suppressed):
            event = parse_upstream(text.encode())
            if isinstance(event, dict) and _response_id(event) in self.suppressed:
                await self._suppressed(event)
                return False
        if self.suppressed_items and any(i in text for i in self.suppressed_items):
            event = parse_upstream(text.encode())
            if isinstance(event, dict) and _item_id(event) in self.suppressed_items:
                return False
        if '"response.' not in text and '"error"' not in text:
            return True
        event = parse_upstream(text.encode())
        if not isinstance(event, dict):
            return True
        etype = event.get("type")
        rid = _response_id(event)
        if etype == "response.created" and isinstance(rid, str):
            if self.creates:
                _, answer = self.creates.popleft()
            else:  # begun by the upstream itself (server VAD), not by a client event
                started = await self._started(rid)
                if started is None:
                    return False
                answer = started
            self.active[rid] = answer
            answer.ex.response_id = rid
        elif etype == "error":
            await self._errored(event)
            return True
        answer_of = self.active.get(rid) if isinstance(rid, str) else None
        if answer_of is None:
            return True
        answer_of.event(event)
        answer_of.ex.stream_events += 1
        if answer_of.has_work():
            await answer_of.work()
        if etype == "response.done":
            del self.active[str(rid)]
            await self._settle(answer_of, _status(event) != "failed")
        return True

    async def _started(self, rid: str) -> Answer | None:
        """A response the upstream started by itself, admitted as it is announced; refused:
        cancelled upstream, its events dropped, the client told, what it used settled."""
        gw = self.gw
        assert self.principal is not None
        ex = self.response(self.conn.model)
        ex.response_id = rid
        answer = Answer(gw, ex, None, "realtime")
        self.pending.append(answer)
        for obs in gw.observers:
            obs.started(ex)
        name = self.principal.tenant
        tenant = gw.snap.loaded.config.tenants.get(name)  # None: a reload removed it
        try:
            self.recheck()  # refuses a removed tenant too
            await gw.gate.admit(
                ex, name, tenant_of(gw.snap, self.principal), ex.model or "", "rate"
            )
        except GatewayError as exc:
            ex.status, ex.error_code = exc.status, exc.code
            if tenant is not None:
                gw.gate.charge_only(ex, name, tenant, ex.model or "")
            self.suppressed[rid] = answer
            cancel = {"type": "response.cancel", "response_id": rid}
            assert self.upstream is not None
            with contextlib.suppress(Exception):
                await self.upstream.send_str(dump_json(cancel).decode())
            if isinstance(exc, Unauthenticated):
                await self.revoke(exc)
            else:
                await self._send_text(frame_error(exc))
            return None
        return answer

    async def _suppressed(self, event: dict[str, Any]) -> None:
        """A frame of a refused response: read (its usage), never relayed."""
        rid = _response_id(event)
        answer = self.suppressed[str(rid)]
        answer.event(event)
        item = event.get("item")
        added = event.get("type") == "response.output_item.added"
        if added and isinstance(item, dict) and isinstance(item.get("id"), str):
            self.suppressed_items.add(item["id"])
        if event.get("type") == "response.done":
            del self.suppressed[str(rid)]
            await self._settle(answer, False)

    async def _errored(self, event: dict[str, Any]) -> None:
        """An ``error`` event about a ``response.create`` still awaiting its response:
        that request ended (its admission given back, nothing used)."""
        error = event.get("error")
        about = error.get("event_id") if isinstance(error, dict) else None
        for n, (event_id, answer) in enumerate(self.creates):
            if event_id == about:
                del self.creates[n]
                await self._settle(answer, False)
                return

    async def _settle(self, answer: Answer, ok: bool) -> None:
        with contextlib.suppress(ValueError):
            self.pending.remove(answer)
        await answer.settle(ok)

    async def settle_all(self) -> None:
        self.creates.clear()
        self.active.clear()
        self.suppressed.clear()
        await super().settle_all()


def _response_id(event: dict[str, Any]) -> Any:
    """The response an upstream event belongs to (``response_id``, or its response's id)."""
    rid = event.get("response_id")
    if rid is None and isinstance(event.get("response"), dict):
        rid = event["response"].get("id")
    return rid


def _item_id(event: dict[str, Any]) -> Any:
    item = event.get("item")
    return item.get("id") if isinstance(item, dict) else event.get("item_id")


def _status(event: dict[str, Any]) -> Any:
    response = event.get("response")
    return response.get("status") if isinstance(response, dict) else None
