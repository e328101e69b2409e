"""Realtime over WebSocket: ``/openai/v1/realtime?model=…`` and
``/openai/realtime?api-version=…&deployment=…``, with every rule HTTP has.

The key comes in a header, the ``api-key`` query parameter or the browser's
``openai-insecure-api-key.KEY`` subprotocol (never logged: uvicorn's handshake lines,
which carry the query, are dropped; the gateway's access line has no query). The logical
model is checked against the tenant's allowlist and regions and becomes the deployment
in the upstream URL; the upstream socket opens at the handshake, with the gateway's
credential, and the connection holds one concurrency slot. Client frames: a
``session.update`` has its transcription model rewritten to a deployment (allowlist
checked) and its MCP tools policy-checked (the ``require_approval`` rewrite) and
audited, and goes up as the gateway's serialisation; a ``response.create`` is admitted
against the tenant's rate, token and money limits (an ``error`` frame when refused);
every other frame — audio included — goes up unchanged. Server frames come back
unchanged; ``response.done`` settles its response's usage (tokens, cost, ledger,
metrics, an access line).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .audit import check_tool_policy
from .errors import BadRequest, GatewayError, NotFound
from .outbound import Query
from .routes import PREVIEW, V1
from .validate import dump_json, parse_json, parse_upstream
from .websocket import Socket, _frame_error

REALTIME_PATHS = {V1 + "/realtime": V1, PREVIEW + "/realtime": PREVIEW}


class RealtimeSocket(Socket):
    """One client connection to the Realtime API."""

    operation = "realtime.socket"
    api = "realtime"

    async def before_accept(self) -> None:
        query = Query(self.scope.get("query_string", b""))
        self.query = query
        self.preview = REALTIME_PATHS[self.scope["path"]] == PREVIEW
        model = query.get("deployment" if self.preview else "model")
        if not model:
            param = "deployment" if self.preview else "model"
            raise BadRequest(f"Missing required query parameter '{param}'.", param=param)
        if self.preview and not query.get("api-version"):
            raise NotFound("The /openai/realtime form needs its api-version query parameter.")
        self.conn.model = model

    async def open_at_handshake(self) -> None:
        principal, snap = self.principal, self.snap
        assert principal is not None and self.conn.model is not None
        tenant = snap.loaded.config.tenants[principal.tenant]
        targets = snap.router.targets(principal.tenant, tenant, self.conn.model, None)
        name = "deployment" if self.preview else "model"
        # The query as parsed, the logical model replaced by the deployment, no key.
        for target in targets:
            query = self.query.encoded({name: target.deployment})
            path = (PREVIEW if self.preview else V1) + "/realtime"
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
                message = await self._client_message()
                if message is None:
                    return
                data = message.get("bytes")
                if data is not None:
                    await self.upstream.send_bytes(data)
                    continue
                text = message.get("text") or ""
                try:
                    out = await self._check(text)
                except GatewayError as exc:
                    await self._send_text(_frame_error(exc))
                    continue
                await self.upstream.send_str(out)
        finally:
            self.closed = True
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _check(self, text: str) -> str:
        """A client frame, checked: what to send upstream (raises for an error frame)."""
        frame = parse_json(text.encode(), self.snap.loaded.config.server.max_json_depth)
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "session.update" and isinstance(frame, dict):
            await self._session(frame)
            return dump_json(frame).decode()
        if kind == "response.create" and isinstance(frame, dict):
            await self._admit_response(frame)
            return dump_json(frame).decode()
        return text

    async def _session(self, frame: dict[str, Any]) -> None:
        principal, snap = self.principal, self.snap
        assert principal is not None and self.target is not None
        tenant = snap.loaded.config.tenants[principal.tenant]
        session = frame.get("session")
        if not isinstance(session, dict):
            return
        for path in (("input_audio_transcription",), ("audio", "input", "transcription")):
            node: Any = session
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and node.get("model") is not None:
                model = node["model"]
                param = "session." + ".".join(path) + ".model"
                if not isinstance(model, str):
                    raise BadRequest(f"'{param}' must be a string.", param=param)
                dep = snap.router.deployment_on(
                    principal.tenant, tenant, model, self.target.resource, param
                )
                if dep is None:
                    raise BadRequest(
                        f"Model '{model}' ({param}) is not deployed on this session's resource.",
                        code="model_not_on_connection_resource",
                        param=param,
                    )
                node["model"] = dep
        tools = session.get("tools")
        decisions = check_tool_policy(principal.tenant, tenant, tools)
        if self.gw.audit.enabled and isinstance(tools, list):
            ex = self._new_response(self.conn.model)
            records = self.gw.audit.request_records(ex, {"tools": tools}, decisions)
            await self.gw.audit.write(ex, records, before_forward=True)

    async def _admit_response(self, frame: dict[str, Any]) -> None:
        principal = self.principal
        assert principal is not None
        tenant = self.snap.loaded.config.tenants[principal.tenant]
        response = frame.get("response")
        if isinstance(response, dict) and isinstance(response.get("tools"), list):
            check_tool_policy(principal.tenant, tenant, response["tools"])
            frame["response"] = response
        ex = self._new_response(self.conn.model)
        await self.gw.gate.admit(ex, principal.tenant, tenant, self.conn.model or "", "rate")
        for obs in self.gw.observers:
            obs.started(ex)
        self.pending.append(ex)

    async def _seen(self, text: str) -> None:
        if '"response.' not in text:
            return
        event = parse_upstream(text.encode())
        if not isinstance(event, dict):
            return
        etype = event.get("type")
        response = event.get("response")
        if etype == "response.created" and isinstance(response, dict):
            if not self.pending:  # begun by the server (voice activity), not by a frame
                ex = self._new_response(self.conn.model)
                for obs in self.gw.observers:
                    obs.started(ex)
                self.pending.append(ex)
            if isinstance(response.get("id"), str):
                self.pending[0].response_id = response["id"]
        elif etype == "response.done" and self.pending:
            ex = self.pending.pop(0)
            await self._ended(ex, response, True)
