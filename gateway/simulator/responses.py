"""The simulator's Responses API: create (JSON, SSE, background), retrieve (and stream
resume), delete, cancel, input_items, compact, input_tokens; on both path forms."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .base import Ctx
from .shapes import (
    Json,
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


def routes(ctx: Ctx) -> list[Route]:
    """The Responses endpoints."""
    sim = ctx.sim
    record = ctx.record
    headers = ctx.headers

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

    def produce(body: Json, rec_headers: dict[str, str]) -> tuple[Json, list[Json]] | Response:
        """A new response to ``body`` and its stream events (stored unless store: false),
        or the error Azure answers; for HTTP creates and WebSocket ``response.create``."""
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
        _token_details(resp["usage"], rec_headers)
        events = stream_events(resp)
        delay = float(rec_headers.get("x-sim-delay", sim.delay))
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
        return resp, events

    ctx.produce = produce

    @invalid
    async def create(request: Request) -> Response:
        rec, err = await record(request)
        if err:
            return err
        body = json.loads(rec.body)
        made = produce(body, rec.headers)
        if isinstance(made, Response):
            return made
        resp, events = made
        delay = float(rec.headers.get("x-sim-delay", sim.delay))
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

    routes: list[Route] = []
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
    return routes
