"""A local Azure OpenAI Responses API simulator, and a managed-identity token endpoint.

For the demo and the tests: both path forms, JSON and SSE with ``sequence_number``,
background mode with cancel and stream resume, input_items, compact, MCP items
when MCP tools are sent, and injected failures. Control per request with headers
``x-sim-status`` (answer with that error), ``x-sim-delay`` (seconds between stream
events) and ``x-sim-hang`` (seconds before answering), or through ``SimState``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import sim_surface
from .sim_shapes import (
    _error,
    _id,
    _input_items,
    _token_details,
    _usage,
    _user_text,
    build_response,
    encode_event,
    stream_events,
)

Json = dict[str, Any]
IDENTITY_HEADER = "sim-identity-header"


@dataclass
class Recorded:
    """One request as the simulator received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class SimState:
    """Everything the simulator remembers; tests read and steer it."""

    region: str = "swedencentral"
    api_key: str = "sim-api-key"
    delay: float = 0.0
    background_seconds: float = 0.3
    token_expires_in: float = 3600.0
    token_delay: float = 0.0
    fail_queue: list[int] = field(default_factory=list)
    fail_headers: dict[str, str] = field(default_factory=lambda: {"retry-after": "1"})
    fail_message: str = ""  # the injected error's message; default "Simulated upstream error N."
    responses: dict[str, Json] = field(default_factory=dict)
    inputs: dict[str, list[Json]] = field(default_factory=dict)
    events: dict[str, list[Json]] = field(default_factory=dict)
    ready_at: dict[str, float] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    sent_streams: list[bytes] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    on_request: Callable[[Recorded], None] | None = None
    files: dict[str, tuple[Json, bytes]] = field(default_factory=dict)
    conversations: dict[str, tuple[Json, list[Json]]] = field(default_factory=dict)
    vector_stores: dict[str, tuple[Json, dict[str, Json]]] = field(default_factory=dict)
    containers: dict[str, tuple[Json, dict[str, tuple[Json, bytes]]]] = field(default_factory=dict)
    stale_reads: int = 0  # the next N lookups of stored objects answer "not found"
    started: list[str] = field(default_factory=list)  # paths, as each request's head arrives

    max_stored: int = 2_000

    def forget_oldest(self) -> None:
        """Keep at most ``max_stored`` responses (and requests), like a bounded store."""
        while len(self.responses) > self.max_stored:
            rid = next(iter(self.responses))
            for store in (self.responses, self.inputs, self.events, self.ready_at):
                store.pop(rid, None)
        if len(self.requests) > 2 * self.max_stored:
            del self.requests[: self.max_stored]
        if len(self.sent_streams) > self.max_stored:
            del self.sent_streams[: self.max_stored // 2]

    def stale(self) -> bool:
        """Whether this lookup is one of the next ``stale_reads`` that miss (and count it)."""
        if self.stale_reads > 0:
            self.stale_reads -= 1
            return True
        return False

    def api_requests(self) -> list[Recorded]:
        """Every API request (not the token endpoint's)."""
        return [r for r in self.requests if r.path.startswith("/openai/")]

    def new_container(self, name: str) -> Json:
        """A container with one generated file in it (a plot, as code interpreter makes)."""
        from .sim_surface import PNG

        cid = _id("cntr")
        fid = _id("cfile")
        meta = {
            "id": fid,
            "object": "container.file",
            "container_id": cid,
            "path": f"/mnt/data/{fid}.png",
            "bytes": len(PNG),
            "source": "assistant",
        }
        obj = {
            "id": cid,
            "object": "container",
            "name": name,
            "created_at": int(time.time()),
            "status": "running",
        }
        self.containers[cid] = (obj, {fid: (meta, PNG)})
        return obj


def create_simulator(state: SimState | None = None) -> Starlette:
    """The simulator ASGI app; ``app.state.sim`` is its ``SimState``."""
    sim = state or SimState()

    async def record(request: Request) -> tuple[Recorded, Response | None]:
        sim.started.append(request.url.path)
        if len(sim.started) > 2 * sim.max_stored:
            del sim.started[: sim.max_stored]
        rec = Recorded(
            request.method,
            request.url.path,
            request.url.query,
            {k.lower(): v for k, v in request.headers.items()},
            await request.body(),
        )
        sim.requests.append(rec)
        if sim.on_request is not None:
            sim.on_request(rec)
        if (
            request.url.path.startswith("/openai/")
            and not request.url.path.startswith("/openai/v1/")
            and "api-version" not in request.query_params
        ):
            return rec, _error(404, "Resource not found", "404")
        auth = rec.headers.get("authorization", "")
        if not (auth.startswith("Bearer sim-token-") or rec.headers.get("api-key") == sim.api_key):
            return rec, _error(401, "Access denied due to invalid credentials.", "401")
        hang = float(rec.headers.get("x-sim-hang", "0"))
        if hang:
            await asyncio.sleep(hang)
        status = int(rec.headers.get("x-sim-status", "0")) or (
            sim.fail_queue.pop(0) if sim.fail_queue else 0
        )
        if status:
            message = sim.fail_message or f"Simulated upstream error {status}."
            resp = _error(status, message, str(status))
            resp.headers.update(sim.fail_headers)
            return rec, resp
        return rec, None

    def headers() -> dict[str, str]:
        return {
            "x-request-id": _id("sim"),
            "apim-request-id": _id("apim"),
            "x-ms-region": sim.region,
            "x-ratelimit-remaining-requests": "4999",
            "x-ratelimit-remaining-tokens": "123456",
        }

    def emit(events: list[Json], delay: float) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            sent = bytearray()
            try:
                for ev in events:
                    if delay:
                        await asyncio.sleep(delay)
                    chunk = encode_event(ev)
                    sent += chunk
                    yield chunk
            finally:
                sim.sent_streams.append(bytes(sent))

        return gen()

    def current(rid: str) -> Json | None:
        resp = sim.responses.get(rid)
        pending = resp is not None and resp["status"] in ("queued", "in_progress")
        if resp is not None and pending and time.time() >= sim.ready_at.get(rid, 0):
            resp.update(sim.events[rid][-1]["response"], status="completed")
        return resp

    def not_found(rid: str) -> Response:
        return _error(404, f"Response with id '{rid}' not found.", "not_found", "response_id")

    def missing_previous(body: Json) -> Response | None:
        prev = body.get("previous_response_id")
        if prev and (sim.stale() or prev not in sim.responses):
            message = f"Previous response with id '{prev}' not found."
            return _error(400, message, "previous_response_not_found", "previous_response_id")
        return None

    def missing_objects(body: Json) -> Response | None:
        """A named file, vector store, container or conversation this resource lacks."""
        conv = body.get("conversation")
        conv_id = conv.get("id") if isinstance(conv, dict) else conv
        if conv_id and conv_id not in sim.conversations:
            return _error(404, f"Conversation '{conv_id}' not found.", "not_found", "conversation")
        inputs = body.get("input")
        for item in inputs if isinstance(inputs, list) else []:
            for part in item.get("content") if isinstance(item.get("content"), list) else []:
                fid = part.get("file_id") if isinstance(part, dict) else None
                if fid and fid not in sim.files:
                    return _error(404, f"File '{fid}' not found.", "not_found", "file_id")
        for tool in body.get("tools") or []:
            for vid in tool.get("vector_store_ids") or []:
                if vid not in sim.vector_stores:
                    return _error(404, f"Vector store '{vid}' not found.", "not_found")
            container = tool.get("container")
            if isinstance(container, str) and container not in sim.containers:
                return _error(404, f"Container '{container}' not found.", "not_found")
            for fid in (
                (container or {}).get("file_ids") or [] if isinstance(container, dict) else []
            ):
                if fid not in sim.files:
                    return _error(404, f"File '{fid}' not found.", "not_found")
        return None

    def invalid(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """Input the simulator cannot make sense of is a 400, as Azure answers it."""

        async def handler(request: Request) -> Response:
            try:
                result: Response = await fn(request)
            except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
                message = f"Invalid request body ({type(exc).__name__})."
                return _error(400, message, "invalid_request")
            return result

        return handler

    @invalid
    async def create(request: Request) -> Response:
        rec, err = await record(request)
        if err:
            return err
        body = json.loads(rec.body)
        missing = missing_previous(body) or missing_objects(body)
        if missing:
            return missing
        items = _input_items(body)
        resp = build_response(body, items)
        for tool in body.get("tools") or []:
            if tool.get("type") == "code_interpreter":
                container = tool.get("container")
                cid = container if isinstance(container, str) else None
                cid = cid or sim.new_container("auto")["id"]
                call: Json = {
                    "type": "code_interpreter_call",
                    "id": _id("ci"),
                    "status": "completed",
                    "container_id": cid,
                    "code": "plot()",
                    "outputs": [],
                }
                resp["output"].insert(0, call)
        conv = body.get("conversation")
        conv_id = conv.get("id") if isinstance(conv, dict) else conv
        if conv_id:
            sim.conversations[conv_id][1].extend([*items, *resp["output"]])
            resp["conversation"] = {"id": conv_id}
        _token_details(resp["usage"], rec.headers)
        events = stream_events(resp)
        delay = float(rec.headers.get("x-sim-delay", sim.delay))
        if body.get("store", True) is not False:
            sim.inputs[resp["id"]] = items
            sim.events[resp["id"]] = events
            stored = dict(resp)
            if body.get("background"):
                stored.update(status="queued", output=[], usage=None)
                span = max(sim.background_seconds, delay * len(events))
                sim.ready_at[resp["id"]] = time.time() + span
            sim.responses[resp["id"]] = stored
            sim.forget_oldest()
        if body.get("stream"):
            return StreamingResponse(
                emit(events, delay), media_type="text/event-stream", headers=headers()
            )
        out = sim.responses.get(resp["id"], resp) if body.get("background") else resp
        return JSONResponse(out, headers=headers())

    async def retrieve(request: Request) -> Response:
        rec, err = await record(request)
        if err:
            return err
        rid = request.path_params["rid"]
        resp = current(rid)
        if resp is None or sim.stale():
            return not_found(rid)
        if request.query_params.get("stream") == "true":
            after = int(request.query_params.get("starting_after", "-1"))
            events = [e for e in sim.events.get(rid, []) if e["sequence_number"] > after]
            delay = float(rec.headers.get("x-sim-delay", sim.delay))
            return StreamingResponse(
                emit(events, delay), media_type="text/event-stream", headers=headers()
            )
        return JSONResponse(resp, headers=headers())

    async def delete(request: Request) -> Response:
        _, err = await record(request)
        if err:
            return err
        rid = request.path_params["rid"]
        if sim.responses.pop(rid, None) is None:
            return not_found(rid)
        return JSONResponse(
            {"id": rid, "object": "response.deleted", "deleted": True}, headers=headers()
        )

    async def cancel(request: Request) -> Response:
        _, err = await record(request)
        if err:
            return err
        rid = request.path_params["rid"]
        resp = current(rid)
        if resp is None:
            return not_found(rid)
        if not resp.get("background"):
            return _error(400, "Only background responses can be cancelled.", "invalid_request")
        if resp["status"] in ("queued", "in_progress"):
            resp["status"] = "cancelled"
            sim.ready_at.pop(rid, None)
        return JSONResponse(resp, headers=headers())

    async def input_items(request: Request) -> Response:
        _, err = await record(request)
        if err:
            return err
        rid = request.path_params["rid"]
        if rid not in sim.responses:
            return not_found(rid)
        q = request.query_params
        items = list(sim.inputs.get(rid, []))
        if q.get("order", "desc") == "desc":
            items.reverse()
        if q.get("after"):
            ids = [i["id"] for i in items]
            items = items[ids.index(q["after"]) + 1 :] if q["after"] in ids else []
        limit = int(q.get("limit", "20"))
        page = items[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            },
            headers=headers(),
        )

    @invalid
    async def compact(request: Request) -> Response:
        rec, err = await record(request)
        if err:
            return err
        body = json.loads(rec.body)
        missing = missing_previous(body)
        if missing:
            return missing
        prev = body.get("previous_response_id")
        items = sim.inputs.get(prev, []) if prev else _input_items(body)
        cmp_id = _id("resp")
        out: Json = {
            "id": cmp_id,
            "object": "response.compaction",
            "created_at": int(time.time()),
            "output": [
                *items,
                {"type": "compaction", "id": _id("cmp"), "encrypted_content": "c2lt"},
            ],
            "usage": _usage(len(items) * 4 + 1, 8),
        }
        # The compaction result is a stored object: retrievable, and a previous response.
        sim.responses[cmp_id] = {**out, "status": "completed"}
        sim.inputs[cmp_id] = list(out["output"])
        sim.forget_oldest()
        return JSONResponse(out, headers=headers())

    @invalid
    async def input_tokens(request: Request) -> Response:
        rec, err = await record(request)
        if err:
            return err
        items = _input_items(json.loads(rec.body))
        count = sum(len(_user_text([i]).split()) for i in items) + 5
        return JSONResponse(
            {"object": "response.input_tokens", "input_tokens": count}, headers=headers()
        )

    async def token(request: Request) -> Response:
        sim.requests.append(
            Recorded("GET", request.url.path, request.url.query, dict(request.headers), b"")
        )
        if request.headers.get("x-identity-header") != IDENTITY_HEADER:
            return JSONResponse({"error": "invalid identity header"}, 401)
        if not request.query_params.get("resource"):
            return JSONResponse({"error": "resource is required"}, 400)
        if sim.token_delay:
            await asyncio.sleep(sim.token_delay)
        tok = f"sim-token-{len(sim.tokens_issued)}-{secrets.token_hex(8)}"
        sim.tokens_issued.append(tok)
        return JSONResponse(
            {
                "access_token": tok,
                "expires_on": str(int(time.time() + sim.token_expires_in)),
                "resource": request.query_params["resource"],
                "token_type": "Bearer",
            }
        )

    routes = [Route("/msi/token", token, methods=["GET"])]
    for prefix in ("/openai/v1/responses", "/openai/responses"):
        routes += [
            Route(prefix, create, methods=["POST"]),
            Route(prefix + "/compact", compact, methods=["POST"]),
            Route(prefix + "/input_tokens", input_tokens, methods=["POST"]),
            Route(prefix + "/{rid}", retrieve, methods=["GET"]),
            Route(prefix + "/{rid}", delete, methods=["DELETE"]),
            Route(prefix + "/{rid}/cancel", cancel, methods=["POST"]),
            Route(prefix + "/{rid}/input_items", input_items, methods=["GET"]),
        ]
    routes += sim_surface.routes(sim, record, headers, _error, _id)

    async def unknown(request: Request, exc: Exception) -> Response:
        """Paths and methods Azure does not have: its JSON 404 (not Starlette's text)."""
        return _error(404, "Resource not found", "404")

    app = Starlette(routes=routes, exception_handlers={404: unknown, 405: unknown})
    app.state.sim = sim
    return app
