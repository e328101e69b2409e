"""The simulator's model endpoints beside Responses: chat completions, completions,
embeddings, images and audio (echoes, fixed vectors, a tiny PNG, a few audio bytes)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .base import Ctx, Recorded
from .shapes import PNG, SPEECH, Json


def routes(ctx: Ctx) -> list[Route]:
    """The model endpoints, on all three path forms."""
    sim = ctx.sim
    headers = ctx.headers
    error = ctx.error
    new_id = ctx.new_id
    ok = ctx.ok
    missing = ctx.missing
    handler = ctx.handler
    form = ctx.form

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
