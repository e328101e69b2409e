"""The simulator's stored objects: Files, conversations, vector stores, containers.

Each simulated resource keeps its own objects, so a request the gateway sends to the
wrong resource fails here as it would on Azure."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .base import Ctx, Recorded
from .shapes import Json


def routes(ctx: Ctx) -> list[Route]:
    """The stored-object endpoints, on both path forms."""
    sim = ctx.sim
    headers = ctx.headers
    new_id = ctx.new_id
    ok = ctx.ok
    listing = ctx.listing
    missing = ctx.missing
    form = ctx.form

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
        delay = 0.0
        if sim.content_delays > 0:
            sim.content_delays -= 1
            delay = sim.content_delay

        async def chunks() -> AsyncIterator[bytes]:
            if delay:
                yield content[:1]  # the answer has begun; the rest comes late
                await asyncio.sleep(delay)
                yield content[1:]
                return
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

    out: list[Route] = []
    add = ctx.on_both
    out += add("/files", file_create, ["POST"])
    out += add("/files", file_list, ["GET"])
    out += add("/files/{file_id}", file_get, ["GET"])
    out += add("/files/{file_id}", file_delete, ["DELETE"])
    out += add("/files/{file_id}/content", file_content, ["GET"])
    out += add("/conversations", conv_create, ["POST"])
    out += add("/conversations/{conversation_id}", conv_get, ["GET", "POST"])
    out += add("/conversations/{conversation_id}", conv_delete, ["DELETE"])
    out += add("/conversations/{conversation_id}/items", conv_items, ["GET", "POST"])
    out += add("/conversations/{conversation_id}/items/{item_id}", conv_item, ["GET", "DELETE"])
    out += add("/vector_stores", vs_create, ["POST"])
    out += add("/vector_stores", vs_list, ["GET"])
    out += add("/vector_stores/{vector_store_id}", vs_one, ["GET", "POST", "DELETE"])
    out += add("/vector_stores/{vector_store_id}/files", vs_files, ["GET", "POST"])
    out += add("/vector_stores/{vector_store_id}/files/{file_id}", vs_file_one, ["GET", "DELETE"])
    out += add("/vector_stores/{vector_store_id}/search", vs_search, ["POST"])
    out += add("/containers", cntr_create, ["POST"])
    out += add("/containers", cntr_list, ["GET"])
    out += add("/containers/{container_id}", cntr_one, ["GET", "DELETE"])
    out += add("/containers/{container_id}/files", cntr_files, ["GET"])
    out += add("/containers/{container_id}/files/{file_id}", cntr_files, ["GET"])
    out += add("/containers/{container_id}/files/{file_id}/content", cntr_files, ["GET"])
    return out
