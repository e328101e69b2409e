"""The simulator's Batch API, run the way Azure runs it.

A batch takes a ``purpose=batch`` JSONL file, each line ``{custom_id, method, url,
body}``; it is ``validating``, then ``in_progress``, then ``completed`` (about
``SimState.batch_seconds`` in all), with an output file (one answer per good line,
each with its ``usage``) and an error file (the lines that failed). The status moves
on when a batch is read, so no background task is needed. Lines whose ``body.model``
is not in ``SimState.batch_deployments`` (when that is set) fail as Azure fails lines
for a deployment that is not a batch deployment; so do lines whose ``custom_id`` starts
with ``sim-fail`` (for error files on demand).
"""

from __future__ import annotations

import json
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .base import Ctx, Recorded
from .shapes import Json, _id, build_response

URLS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings")


def _answer(url: str, body: Json) -> Json:
    """What the deployment answers to one line's body, with its usage."""
    if url == "/v1/responses":
        items = [{"type": "message", "role": "user", "content": str(body.get("input"))}]
        return build_response(body, items)
    words = len(json.dumps(body).split())
    if url == "/v1/embeddings":
        usage = {"prompt_tokens": words, "total_tokens": words}
        return {"object": "list", "data": [], "model": body.get("model"), "usage": usage}
    usage = {"prompt_tokens": words, "completion_tokens": 7, "total_tokens": words + 7}
    return {
        "id": _id("chatcmpl"),
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo"}}],
        "usage": usage,
    }


def routes(ctx: Ctx) -> list[Route]:
    sim = ctx.sim
    ok, missing, new_id = ctx.ok, ctx.missing, ctx.new_id

    def store_file(content: bytes, name: str) -> str:
        fid = new_id("file").replace("_", "-", 1)
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": "batch_output",
            "status": "processed",
        }
        sim.files[fid] = (obj, content)
        return fid

    def run(batch: Json) -> None:
        """Every line of the input file, answered or failed; the two files written."""
        content = sim.files[batch["input_file_id"]][1]
        out: list[bytes] = []
        errors: list[bytes] = []
        for raw in content.splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            body = line.get("body") or {}
            model = body.get("model")
            rid = _id("batch_req")
            if (
                line.get("url") not in URLS
                or (sim.batch_deployments is not None and model not in sim.batch_deployments)
                or str(line.get("custom_id")).startswith("sim-fail")  # a line the model fails
            ):
                error = {"code": "invalid_deployment", "message": f"No batch deployment {model}"}
                record = {"id": rid, "custom_id": line.get("custom_id"), "response": None}
                errors.append(json.dumps({**record, "error": error}).encode())
                continue
            response = {
                "status_code": 200,
                "request_id": _id("req"),
                "body": _answer(line["url"], body),
            }
            record = {"id": rid, "custom_id": line.get("custom_id"), "response": response}
            out.append(json.dumps({**record, "error": None}).encode())
        batch["request_counts"] = {
            "total": len(out) + len(errors),
            "completed": len(out),
            "failed": len(errors),
        }
        batch["output_file_id"] = store_file(b"\n".join(out) + b"\n" if out else b"", "out.jsonl")
        if errors:
            batch["error_file_id"] = store_file(b"\n".join(errors) + b"\n", "errors.jsonl")

    def advance(batch: Json) -> Json:
        """The batch's status now: it moves on with time, as Azure's does."""
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return batch
        age = time.time() - sim.batch_started[batch["id"]]
        if batch["status"] == "cancelling":
            if age >= sim.batch_seconds * 0.2:
                batch["status"] = "cancelled"
                batch["cancelled_at"] = int(time.time())
            return batch
        if age >= sim.batch_seconds:
            run(batch)
            batch["status"] = "completed"
            batch["completed_at"] = int(time.time())
        elif age >= sim.batch_seconds * 0.2:
            batch["status"] = "in_progress"
            batch.setdefault("in_progress_at", int(time.time()))
        return batch

    async def create(request: Request, rec: Recorded) -> Response:
        body = json.loads(rec.body)
        fid = body["input_file_id"]
        if fid not in sim.files:
            return missing("file", fid)
        if sim.files[fid][0].get("purpose") != "batch":
            return ctx.error(400, "The input file's purpose must be 'batch'.", "invalid_purpose")
        if body.get("endpoint") not in (*URLS, "/chat/completions", "/responses"):
            return ctx.error(400, "Unsupported endpoint.", "invalid_endpoint", "endpoint")
        bid = new_id("batch")
        batch: Json = {
            "id": bid,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": fid,
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
            "errors": None,
        }
        sim.batches[bid] = batch
        sim.batch_started[bid] = time.time()
        return ok(batch)

    async def listing(request: Request, rec: Recorded) -> Response:
        return ctx.listing([advance(b) for b in reversed(sim.batches.values())], request, 20)

    async def one(request: Request, rec: Recorded) -> Response:
        bid = request.path_params["batch_id"]
        if bid not in sim.batches:
            return missing("batch", bid)
        batch = advance(sim.batches[bid])
        cancel = request.url.path.endswith("/cancel")
        if cancel and batch["status"] in ("validating", "in_progress"):
            batch["status"] = "cancelling"
            sim.batch_started[bid] = time.time()
        return ok(batch)

    out: list[Route] = []
    add = ctx.on_both
    out += add("/batches", create, ["POST"])
    out += add("/batches", listing, ["GET"])
    out += add("/batches/{batch_id}", one, ["GET"])
    out += add("/batches/{batch_id}/cancel", one, ["POST"])
    return out
