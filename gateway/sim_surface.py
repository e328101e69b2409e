"""The simulator beyond Responses: Files, conversations, vector stores, containers, and
the model endpoints (chat completions, completions, embeddings, images, audio).

Each simulated resource keeps its own objects, so a request the gateway sends to the
wrong resource fails here as it would on Azure. Answers have the shapes the ``openai``
SDK parses; contents are made up (echoes, fixed vectors, a tiny PNG, a few audio bytes).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .body import media, read_form
from .errors import BadRequest, GatewayError

if TYPE_CHECKING:
    from .simulator import Recorded, SimState

Json = dict[str, Any]
Recorder = Callable[[Request], Awaitable[tuple["Recorded", Response | None]]]
ErrorFn = Callable[..., Response]

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
SPEECH = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8


def routes(
    sim: SimState,
    record: Recorder,
    headers: Callable[[], dict[str, str]],
    error: ErrorFn,
    new_id: Callable[[str], str],
) -> list[Route]:
    """The simulator's routes for everything but Responses."""

    def ok(body: Json, status: int = 200) -> Response:
        return JSONResponse(body, status, headers=headers())

    def listing(data: list[Json], request: Request | None = None, limit: int = 10_000) -> Response:
        """A list page: ``after`` (an id) and ``limit`` from the request's query, as Azure."""
        if request is not None:
            after = request.query_params.get("after")
            if after:
                ids = [d["id"] for d in data]
                data = data[ids.index(after) + 1 :] if after in ids else []
            limit = int(request.query_params.get("limit", limit))
        page = data[:limit]
        return ok(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(data) > limit,
            }
        )

    def missing(kind: str, oid: str) -> Response:
        return error(404, f"No {kind} found with id '{oid}'.", "not_found")

    def handler(fn: Callable[[Request, Recorded], Awaitable[Response]]) -> Callable[..., Any]:
        async def run(request: Request) -> Response:
            rec, err = await record(request)
            if err is not None:
                return err
            uploading = request.method == "POST" and "/files" in request.url.path
            if not uploading and sim.stale():
                return error(404, "Item with id 'x' not found.", "not_found")
            try:
                return await fn(request, rec)
            except GatewayError as exc:  # a form without a boundary, as the gateway says it
                return error(exc.status, exc.message, exc.code)
            except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
                return error(400, f"Invalid request body ({type(exc).__name__}).", "invalid")

        return run

    async def form(request: Request, rec: Recorded) -> dict[str, Any]:
        """The form's fields (a repeated one: its last copy), files as bytes."""
        kind = media(request.headers.get("content-type"))
        if kind.boundary is None:
            raise BadRequest("This endpoint takes multipart/form-data.")

        async def chunks() -> AsyncIterator[bytes]:
            yield rec.body

        parsed = await read_form(chunks(), kind.boundary, frozenset(), len(rec.body) + 1)
        out: dict[str, Any] = {}
        try:
            for part in parsed.parts:
                if part.spool is None:
                    out[part.name] = bytes(part.value).decode()
                    continue
                part.spool.seek(0)
                out[part.name] = part.spool.read()
                out["_filename"] = part.filename
        finally:
            parsed.close()
        return out

    # -- files ---------------------------------------------------------------

    async def file_create(request: Request, rec: Recorded) -> Response:
        fields = await form(request, rec)
        content = fields["file"]
        obj = {
            "id": new_id("file").replace("_", "-", 1),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": fields.get("_filename", "upload"),
            "purpose": fields.get("purpose", "assistants"),
            "status": "processed",
        }
        sim.files[obj["id"]] = (obj, content)
        return ok(obj)

    async def file_list(request: Request, rec: Recorded) -> Response:
        return listing([obj for obj, _ in sim.files.values()], request)

    async def file_get(request: Request, rec: Recorded) -> Response:
        fid = request.path_params["file_id"]
        if fid not in sim.files:
            return missing("file", fid)
        return ok(sim.files[fid][0])

    async def file_delete(request: Request, rec: Recorded) -> Response:
        fid = request.path_params["file_id"]
        if sim.files.pop(fid, None) is None:
            return missing("file", fid)
        return ok({"id": fid, "object": "file", "deleted": True})

    async def file_content(request: Request, rec: Recorded) -> Response:
        fid = request.path_params["file_id"]
        if fid not in sim.files:
            return missing("file", fid)
        content = sim.files[fid][1]

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(content), 65536):
                yield content[start : start + 65536]

        return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers())

    # -- conversations -------------------------------------------------------

    def items_of(raw: Any) -> list[Json]:
        out = []
        for item in raw or []:
            item = dict(item)
            item.setdefault("type", "message")
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
            item.setdefault("id", new_id("msg"))
            out.append(item)
        return out

    async def conv_create(request: Request, rec: Recorded) -> Response:
        body = json.loads(rec.body or b"{}")
        conv_id = new_id("conv")
        conv: Json = {
            "id": conv_id,
            "object": "conversation",
            "created_at": int(time.time()),
            "metadata": body.get("metadata") or {},
        }
        sim.conversations[conv_id] = (conv, items_of(body.get("items")))
        return ok(conv)

    async def conv_get(request: Request, rec: Recorded) -> Response:
        cid = request.path_params["conversation_id"]
        if cid not in sim.conversations:
            return missing("conversation", cid)
        conv = sim.conversations[cid][0]
        if request.method == "POST":
            conv["metadata"] = json.loads(rec.body).get("metadata") or {}
        return ok(conv)

    async def conv_delete(request: Request, rec: Recorded) -> Response:
        cid = request.path_params["conversation_id"]
        if sim.conversations.pop(cid, None) is None:
            return missing("conversation", cid)
        return ok({"id": cid, "object": "conversation.deleted", "deleted": True})

    async def conv_items(request: Request, rec: Recorded) -> Response:
        cid = request.path_params["conversation_id"]
        if cid not in sim.conversations:
            return missing("conversation", cid)
        items = sim.conversations[cid][1]
        if request.method == "POST":
            added = items_of(json.loads(rec.body)["items"])
            items.extend(added)
            return listing(added)
        order = request.query_params.get("order", "desc")
        return listing(list(reversed(items)) if order == "desc" else list(items))

    async def conv_item(request: Request, rec: Recorded) -> Response:
        cid = request.path_params["conversation_id"]
        if cid not in sim.conversations:
            return missing("conversation", cid)
        conv, items = sim.conversations[cid]
        iid = request.path_params["item_id"]
        found = [i for i in items if i["id"] == iid]
        if not found:
            return missing("item", iid)
        if request.method == "DELETE":
            items.remove(found[0])
            return ok(conv)
        return ok(found[0])

    # -- vector stores -------------------------------------------------------

    def vs_obj(vid: str) -> Json:
        store, files = sim.vector_stores[vid]
        return {**store, "file_counts": {"completed": len(files), "total": len(files)}}

    def vs_file(vid: str, fid: str) -> Json:
        return {
            "id": fid,
            "object": "vector_store.file",
            "vector_store_id": vid,
            "status": "completed",
            "created_at": int(time.time()),
        }

    async def vs_create(request: Request, rec: Recorded) -> Response:
        body = json.loads(rec.body or b"{}")
        vid = new_id("vs")
        store = {
            "id": vid,
            "object": "vector_store",
            "name": body.get("name"),
            "created_at": int(time.time()),
            "status": "completed",
        }
        for fid in body.get("file_ids") or []:
            if fid not in sim.files:
                return missing("file", fid)
        sim.vector_stores[vid] = (store, {f: vs_file(vid, f) for f in body.get("file_ids") or []})
        return ok(vs_obj(vid))

    async def vs_list(request: Request, rec: Recorded) -> Response:
        return listing([vs_obj(v) for v in sim.vector_stores], request, 20)

    async def vs_one(request: Request, rec: Recorded) -> Response:
        vid = request.path_params["vector_store_id"]
        if vid not in sim.vector_stores:
            return missing("vector store", vid)
        if request.method == "DELETE":
            del sim.vector_stores[vid]
            return ok({"id": vid, "object": "vector_store.deleted", "deleted": True})
        if request.method == "POST":
            sim.vector_stores[vid][0]["name"] = json.loads(rec.body).get("name")
        return ok(vs_obj(vid))

    async def vs_files(request: Request, rec: Recorded) -> Response:
        vid = request.path_params["vector_store_id"]
        if vid not in sim.vector_stores:
            return missing("vector store", vid)
        files = sim.vector_stores[vid][1]
        if request.method == "POST":
            fid = json.loads(rec.body)["file_id"]
            if fid not in sim.files:
                return missing("file", fid)
            files[fid] = vs_file(vid, fid)
            return ok(files[fid])
        return listing(list(files.values()))

    async def vs_file_one(request: Request, rec: Recorded) -> Response:
        vid = request.path_params["vector_store_id"]
        if vid not in sim.vector_stores:
            return missing("vector store", vid)
        files = sim.vector_stores[vid][1]
        fid = request.path_params["file_id"]
        if fid not in files:
            return missing("vector store file", fid)
        if request.method == "DELETE":
            del files[fid]
            return ok({"id": fid, "object": "vector_store.file.deleted", "deleted": True})
        return ok(files[fid])

    async def vs_search(request: Request, rec: Recorded) -> Response:
        vid = request.path_params["vector_store_id"]
        if vid not in sim.vector_stores:
            return missing("vector store", vid)
        query = json.loads(rec.body).get("query")
        data: list[Json] = [
            {
                "file_id": fid,
                "filename": sim.files[fid][0]["filename"] if fid in sim.files else fid,
                "score": 0.9,
                "attributes": {},
                "content": [{"type": "text", "text": f"match for {query}"}],
            }
            for fid in sim.vector_stores[vid][1]
        ]
        return ok(
            {
                "object": "vector_store.search_results.page",
                "search_query": [query],
                "data": data,
                "has_more": False,
                "next_page": None,
            }
        )

    # -- containers ----------------------------------------------------------

    async def cntr_create(request: Request, rec: Recorded) -> Response:
        body = json.loads(rec.body or b"{}")
        return ok(sim.new_container(body.get("name") or "container"))

    async def cntr_list(request: Request, rec: Recorded) -> Response:
        return listing([c for c, _ in sim.containers.values()], request, 20)

    async def cntr_one(request: Request, rec: Recorded) -> Response:
        cid = request.path_params["container_id"]
        if cid not in sim.containers:
            return missing("container", cid)
        if request.method == "DELETE":
            del sim.containers[cid]
            return ok({"id": cid, "object": "container.deleted", "deleted": True})
        return ok(sim.containers[cid][0])

    async def cntr_files(request: Request, rec: Recorded) -> Response:
        cid = request.path_params["container_id"]
        if cid not in sim.containers:
            return missing("container", cid)
        files = sim.containers[cid][1]
        fid = request.path_params.get("file_id")
        if fid is None:
            return listing([meta for meta, _ in files.values()])
        if fid not in files:
            return missing("container file", fid)
        if request.url.path.endswith("/content"):
            return Response(files[fid][1], media_type="image/png", headers=headers())
        return ok(files[fid][0])

    # -- model endpoints -----------------------------------------------------

    def deployment(request: Request, body: Json) -> str:
        return str(request.path_params.get("deployment") or body.get("model"))

    def last_text(messages: Any) -> str:
        for m in reversed(messages or []):
            content = m.get("content")
            if isinstance(content, str):
                return content
            for part in content or []:
                if part.get("type") == "text":
                    return str(part["text"])
        return "hello"

    async def chat(request: Request, rec: Recorded) -> Response:
        body = json.loads(rec.body)
        model = deployment(request, body)
        if "prompt" in body:  # legacy completions
            text = str(body["prompt"])
            choice: Json = {"index": 0, "text": f"Echo: {text}", "finish_reason": "stop"}
            obj = "text_completion"
        else:
            for m in body["messages"]:
                for part in m.get("content") if isinstance(m.get("content"), list) else []:
                    fid = (part.get("file") or {}).get("file_id")
                    if fid and fid not in sim.files:
                        return missing("file", fid)
            text = last_text(body["messages"])
            choice = {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"Echo: {text}"},
            }
            obj = "chat.completion"
        words = f"Echo: {text}".split(" ")
        usage = {
            "prompt_tokens": len(text.split()) + 7,
            "completion_tokens": len(words),
            "total_tokens": len(text.split()) + 7 + len(words),
        }
        cid = new_id("chatcmpl").replace("_", "-", 1)
        created = int(time.time())
        if not body.get("stream"):
            out = {
                "id": cid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
            return ok(out)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        delay = float(rec.headers.get("x-sim-delay", sim.delay))
        chunk_obj = obj + ".chunk" if obj == "chat.completion" else obj

        def chunk(delta: Json | None, finish: str | None, use: Json | None = None) -> bytes:
            choices = (
                [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            )
            data: Json = {
                "id": cid,
                "object": chunk_obj,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = use
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        async def gen() -> AsyncIterator[bytes]:
            import asyncio

            sent = bytearray()
            try:
                frames = [chunk({"role": "assistant", "content": ""}, None)]
                frames += [
                    chunk({"content": w if i == 0 else " " + w}, None) for i, w in enumerate(words)
                ]
                frames.append(chunk({}, "stop"))
                if include_usage:
                    frames.append(chunk(None, None, usage))
                frames.append(b"data: [DONE]\n\n")
                for frame in frames:
                    if delay:
                        await asyncio.sleep(delay)
                    sent += frame
                    yield frame
            finally:
                sim.sent_streams.append(bytes(sent))

        return StreamingResponse(gen(), media_type="text/event-stream", headers=headers())

    async def embeddings(request: Request, rec: Recorded) -> Response:
        body = json.loads(rec.body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i in range(len(inputs))
        ]
        n = sum(len(str(x).split()) for x in inputs)
        return ok(
            {
                "object": "list",
                "data": data,
                "model": deployment(request, body),
                "usage": {"prompt_tokens": n, "total_tokens": n},
            }
        )

    async def images(request: Request, rec: Recorded) -> Response:
        if request.headers.get("content-type", "").startswith("multipart/"):
            fields = await form(request, rec)
            if "image" not in fields and "image[]" not in fields:
                return error(400, "image is required", "invalid")
        else:
            json.loads(rec.body)["prompt"]  # required, as on Azure
        usage = {
            "input_tokens": 10,
            "output_tokens": 100,
            "total_tokens": 110,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
        }
        return ok(
            {
                "created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(PNG).decode()}],
                "usage": usage,
            }
        )

    async def transcribe(request: Request, rec: Recorded) -> Response:
        fields = await form(request, rec)
        audio = fields["file"]
        text = f"{len(audio)} bytes of {fields.get('model')} audio"
        if fields.get("stream") != "true":
            return ok({"text": text})
        usage = {"type": "tokens", "input_tokens": 12, "output_tokens": 6, "total_tokens": 18}
        events: list[Json] = [
            {"type": "transcript.text.delta", "delta": w + " "} for w in text.split(" ")
        ]
        events.append({"type": "transcript.text.done", "text": text, "usage": usage})
        frames = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n".encode() for e in events]

        async def gen() -> AsyncIterator[bytes]:
            sent = b"".join(frames)
            try:
                for frame in frames:
                    yield frame
            finally:
                sim.sent_streams.append(sent)

        return StreamingResponse(gen(), media_type="text/event-stream", headers=headers())

    async def speech(request: Request, rec: Recorded) -> Response:
        body = json.loads(rec.body)
        str(body["input"])

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(SPEECH), 1024):
                yield SPEECH[start : start + 1024]

        return StreamingResponse(chunks(), media_type="audio/mpeg", headers=headers())

    out: list[Route] = []

    def add(path: str, fn: Callable[..., Any], methods: list[str]) -> None:
        for prefix in ("/openai/v1", "/openai"):
            out.append(Route(prefix + path, handler(fn), methods=methods))

    add("/files", file_create, ["POST"])
    add("/files", file_list, ["GET"])
    add("/files/{file_id}", file_get, ["GET"])
    add("/files/{file_id}", file_delete, ["DELETE"])
    add("/files/{file_id}/content", file_content, ["GET"])
    add("/conversations", conv_create, ["POST"])
    add("/conversations/{conversation_id}", conv_get, ["GET", "POST"])
    add("/conversations/{conversation_id}", conv_delete, ["DELETE"])
    add("/conversations/{conversation_id}/items", conv_items, ["GET", "POST"])
    add("/conversations/{conversation_id}/items/{item_id}", conv_item, ["GET", "DELETE"])
    add("/vector_stores", vs_create, ["POST"])
    add("/vector_stores", vs_list, ["GET"])
    add("/vector_stores/{vector_store_id}", vs_one, ["GET", "POST", "DELETE"])
    add("/vector_stores/{vector_store_id}/files", vs_files, ["GET", "POST"])
    add("/vector_stores/{vector_store_id}/files/{file_id}", vs_file_one, ["GET", "DELETE"])
    add("/vector_stores/{vector_store_id}/search", vs_search, ["POST"])
    add("/containers", cntr_create, ["POST"])
    add("/containers", cntr_list, ["GET"])
    add("/containers/{container_id}", cntr_one, ["GET", "DELETE"])
    add("/containers/{container_id}/files", cntr_files, ["GET"])
    add("/containers/{container_id}/files/{file_id}", cntr_files, ["GET"])
    add("/containers/{container_id}/files/{file_id}/content", cntr_files, ["GET"])
    for prefix in ("/openai/v1", "/openai", "/openai/deployments/{deployment}"):
        for path, fn, methods in (
            ("/chat/completions", chat, ["POST"]),
            ("/completions", chat, ["POST"]),
            ("/embeddings", embeddings, ["POST"]),
            ("/images/generations", images, ["POST"]),
            ("/images/edits", images, ["POST"]),
            ("/audio/transcriptions", transcribe, ["POST"]),
            ("/audio/translations", transcribe, ["POST"]),
            ("/audio/speech", speech, ["POST"]),
        ):
            out.append(Route(prefix + path, handler(fn), methods=methods))
    return out
