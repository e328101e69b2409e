"""The simulator's shapes: ids, errors, response objects and stream events as Azure
makes them (used by ``simulator`` and ``sim_surface``)."""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from starlette.responses import JSONResponse, Response

Json = dict[str, Any]

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
SPEECH = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 8


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _error(status: int, message: str, code: str, param: str | None = None) -> Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return JSONResponse(body, status)


def _input_items(body: Json) -> list[Json]:
    raw = body.get("input")
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    items = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        item = dict(item)
        if item.get("type") is None and "role" in item:
            item["type"] = "message"
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
        item.setdefault("id", _id("msg" if item["type"] == "message" else "item"))
        items.append(item)
    return items


def _user_text(items: list[Json]) -> str:
    for item in reversed(items):
        for part in item.get("content") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                return str(part["text"])
    return "hello"


def _usage(inp: int, out: int) -> Json:
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": inp + out,
    }


def _mcp_items(body: Json, items: list[Json], text: str) -> tuple[list[Json], bool]:
    """MCP output items for the request's MCP tools; True when approval is awaited."""
    out: list[Json] = []
    waiting = False
    approvals = {
        i.get("approval_request_id"): i for i in items if i.get("type") == "mcp_approval_response"
    }
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            continue
        label = tool.get("server_label", "mcp")
        args = json.dumps({"query": text, "api_key": "sk-sim-argument-secret"})
        approved = next((a for a in approvals.values() if a.get("approve") is True), None)
        if not body.get("previous_response_id"):
            out.append(
                {
                    "type": "mcp_list_tools",
                    "id": _id("mcpl"),
                    "server_label": label,
                    "tools": [
                        {
                            "name": "search",
                            "input_schema": {"type": "object"},
                            "description": "Search",
                        },
                        {
                            "name": "fetch",
                            "input_schema": {"type": "object"},
                            "description": "Fetch",
                        },
                    ],
                }
            )
        if approved is not None or tool.get("require_approval") == "never":
            out.append(
                {
                    "type": "mcp_call",
                    "id": _id("mcp"),
                    "server_label": label,
                    "name": "search",
                    "arguments": args,
                    "output": f"results for {text}",
                    "error": None,
                    "approval_request_id": approved.get("approval_request_id")
                    if approved
                    else None,
                    "status": "completed",
                }
            )
        else:
            waiting = True
            out.append(
                {
                    "type": "mcp_approval_request",
                    "id": _id("mcpr"),
                    "server_label": label,
                    "name": "search",
                    "arguments": args,
                }
            )
    return out, waiting


def _token_details(usage: Json, headers: dict[str, str]) -> None:
    """Cached and reasoning tokens asked for by ``x-sim-cached-tokens`` / ``-reasoning-``."""
    cached = int(headers.get("x-sim-cached-tokens", "0"))
    reasoning = int(headers.get("x-sim-reasoning-tokens", "0"))
    usage["input_tokens"] = max(usage["input_tokens"], cached)
    usage["input_tokens_details"]["cached_tokens"] = cached
    usage["output_tokens"] += reasoning  # reasoning tokens are part of the output
    usage["output_tokens_details"]["reasoning_tokens"] = reasoning
    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]


def build_response(body: Json, items: list[Json], status: str = "completed") -> Json:
    """A Responses API ``response`` object answering ``body``."""
    text = _user_text(items)
    output, waiting = _mcp_items(body, items, text)
    reply = f"Echo: {text}"
    if not waiting:
        output.append(
            {
                "type": "message",
                "id": _id("msg"),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": reply, "annotations": []}],
            }
        )
    out_tokens = len(reply.split()) + 3 * len(output)
    return {
        "id": _id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "background": bool(body.get("background")),
        "model": body.get("model"),
        "output": output,
        "previous_response_id": body.get("previous_response_id"),
        "parallel_tool_calls": True,
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "store": body.get("store", True),
        "text": {"format": {"type": "text"}},
        "metadata": body.get("metadata") or {},
        "error": None,
        "incomplete_details": None,
        "usage": _usage(sum(len(_user_text([i]).split()) for i in items) + 5, out_tokens),
    }


def stream_events(resp: Json) -> list[Json]:
    """The SSE events that produce ``resp``, numbered from 0."""
    events: list[Json] = []
    shell = {**resp, "status": "in_progress", "output": [], "usage": None}
    events.append({"type": "response.created", "response": shell})
    events.append({"type": "response.in_progress", "response": shell})
    for idx, item in enumerate(resp["output"]):
        base = {"output_index": idx, "item_id": item["id"]}
        events.append({"type": "response.output_item.added", "output_index": idx, "item": item})
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": []}
            events.append(
                {"type": "response.content_part.added", **base, "content_index": 0, "part": part}
            )
            words = text.split(" ")
            for n, word in enumerate(words):
                delta = word if n == 0 else " " + word
                events.append(
                    {
                        "type": "response.output_text.delta",
                        **base,
                        "content_index": 0,
                        "delta": delta,
                        "logprobs": [],
                    }
                )
            events.append(
                {
                    "type": "response.output_text.done",
                    **base,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                }
            )
            events.append(
                {
                    "type": "response.content_part.done",
                    **base,
                    "content_index": 0,
                    "part": item["content"][0],
                }
            )
        elif item["type"] == "mcp_list_tools":
            events.append({"type": "response.mcp_list_tools.in_progress", **base})
            events.append({"type": "response.mcp_list_tools.completed", **base})
        elif item["type"] == "mcp_call":
            events.append({"type": "response.mcp_call.in_progress", **base})
            events.append(
                {"type": "response.mcp_call_arguments.delta", **base, "delta": item["arguments"]}
            )
            events.append(
                {"type": "response.mcp_call_arguments.done", **base, "arguments": item["arguments"]}
            )
            events.append({"type": "response.mcp_call.completed", **base})
        events.append({"type": "response.output_item.done", "output_index": idx, "item": item})
    events.append({"type": "response.completed", "response": resp})
    for seq, ev in enumerate(events):
        ev["sequence_number"] = seq
    return events


def encode_event(event: Json) -> bytes:
    """One SSE frame, as Azure writes them."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
