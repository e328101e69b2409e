"""A batch input file (``purpose=batch``), checked line by line like the requests it holds.

Each JSONL line is ``{"custom_id", "method": "POST", "url", "body"}`` and Azure runs its
``body`` against its ``url`` on the batch deployment the body's ``model`` names. So every
line gets what that request would get on its own: strict parsing, the type checks of its
endpoint, the model allowlist and region pin (then ``model`` becomes the batch
deployment, ``batch: true`` in the model's targets), the tool and MCP policy (the
``require_approval`` rewrite included), and ownership of every id it names. A bad line
fails the upload with the status that request would get, ``line N:`` before its message
and its ``param``; nothing is stored upstream. All lines must resolve to one batch
deployment (Azure runs a file on one). What is uploaded is the file rebuilt from the
checked lines (the gateway's serialisation), spooled like any upload: the file is read
from its spool one line at a time, never held whole.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import IO, Any

from .audit import check_tool_policy
from .body import Part
from .config import TenantConfig
from .errors import BadRequest, GatewayError, PayloadTooLarge
from .objects import Refs, owned
from .routing import Target
from .runtime import Snapshot
from .state import StateBackend
from .validate import check_body, check_fields, dump_json, parse_json

# The endpoints a batch line may name, and whose body checks apply to it.
URLS = {
    "/v1/responses": "responses",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/responses": "responses",
    "/chat/completions": "chat",
    "/embeddings": "embeddings",
}
_LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
_SPOOL_MEMORY = 1 << 20


@dataclass
class BatchFile:
    """A checked batch file: where it goes, what it will cost, and its rebuilt bytes."""

    target: Target  # the batch deployment every line runs on
    model: str  # the logical model the lines name
    lines: int
    estimated_tokens: int  # input tokens, about: body bytes / 4
    spool: IO[bytes]
    size: int
    # The MCP content of its lines, for the audit trail: (line, custom_id, the line's MCP
    # tools and MCP input items, the policy's rewrites).
    mcp: list[tuple[int, str, dict[str, Any], list[dict[str, Any]]]]


def _at(line: int, exc: GatewayError) -> GatewayError:
    """``exc`` as the error of line ``line`` of the file."""
    param = f"line {line}: {exc.param}" if exc.param else f"line {line}"
    out = type(exc)(f"line {line}: {exc.message}", code=exc.code, param=param)
    out.headers = exc.headers
    return out


async def check_batch_file(
    snap: Snapshot,
    state: StateBackend,
    tenant_name: str,
    tenant: TenantConfig,
    part: Part,
) -> BatchFile:
    """Check every line of ``part`` (a spooled file); the rebuilt file, or raise."""
    server = snap.loaded.config.server
    limit = server.max_body_bytes
    assert part.spool is not None
    src = part.spool
    src.seek(0)
    out = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)  # noqa: SIM115
    chosen: Target | None = None
    model_of_file = ""
    count = estimated = size = 0
    mcp: list[tuple[int, str, dict[str, Any], list[dict[str, Any]]]] = []
    try:
        number = 0
        while raw := src.readline(limit + 2):
            number += 1
            if len(raw) > limit + 1 or (len(raw) == limit + 1 and not raw.endswith(b"\n")):
                raise _at(
                    number,
                    PayloadTooLarge(
                        f"The line is over {limit} bytes (server.max_body_bytes, the limit of "
                        "one request's body).",
                        code="line_too_large",
                    ),
                )
            text = raw.rstrip(b"\r\n")
            if not text.strip():
                continue
            try:
                line, target, model, decisions = await _check_line(
                    snap, state, tenant_name, tenant, text, server.max_json_depth
                )
            except GatewayError as exc:
                raise _at(number, exc) from None
            content = _mcp_content(line["body"])
            if content or decisions:
                mcp.append((number, line["custom_id"], content, decisions))
            if chosen is None:
                chosen, model_of_file = target, model
            elif (target.resource, target.deployment) != (chosen.resource, chosen.deployment):
                raise _at(
                    number,
                    BadRequest(
                        f"This line runs on another batch deployment than line 1 (model "
                        f"'{model}', not '{model_of_file}'); Azure runs one deployment per "
                        "batch file: split the file by model.",
                        code="mixed_batch_deployments",
                        param="body.model",
                    ),
                )
            data = dump_json(line) + b"\n"
            out.write(data)
            size += len(data)
            count += 1
            estimated += len(text) // 4 + 1
        if chosen is None:
            raise BadRequest(
                "The batch file has no lines; each line is a JSON object with custom_id, "
                "method, url and body.",
                code="empty_batch_file",
                param="file",
            )
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return BatchFile(chosen, model_of_file, count, estimated, out, size, mcp)


def _mcp_content(body: dict[str, Any]) -> dict[str, Any]:
    """A line body's MCP tools and MCP input items (what the audit trail records)."""
    out: dict[str, Any] = {}
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "mcp"]
    if tools:
        out["tools"] = tools
    items = body.get("input")
    if isinstance(items, list):
        mcp_items = [
            i for i in items if isinstance(i, dict) and str(i.get("type", "")).startswith("mcp_")
        ]
        if mcp_items:
            out["input"] = mcp_items
    return out


async def _check_line(
    snap: Snapshot,
    state: StateBackend,
    tenant_name: str,
    tenant: TenantConfig,
    text: bytes,
    depth: int,
) -> tuple[dict[str, Any], Target, str, list[dict[str, Any]]]:
    """One line checked as the request it holds: (the line to upload, target, model, the
    MCP policy's rewrites)."""
    line = parse_json(text, depth)
    if not isinstance(line, dict):
        raise BadRequest("A batch line must be a JSON object.", code="invalid_batch_line")
    extra = sorted(set(line) - _LINE_KEYS)
    if extra:
        raise BadRequest(
            f"Unknown field '{extra[0]}' in the batch line; a line has custom_id, method, "
            "url and body.",
            code="invalid_batch_line",
            param=extra[0],
        )
    if not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        raise BadRequest(
            "Each batch line needs a custom_id (a string).",
            code="invalid_batch_line",
            param="custom_id",
        )
    if line.get("method") != "POST":
        raise BadRequest(
            "A batch line's method must be POST.", code="invalid_batch_line", param="method"
        )
    url = line.get("url")
    api = URLS.get(url) if isinstance(url, str) else None
    if api is None:
        raise BadRequest(
            f"A batch line's url must be one of {', '.join(sorted(URLS))}.",
            code="invalid_batch_line",
            param="url",
        )
    body = line.get("body")
    if not isinstance(body, dict):
        raise BadRequest(
            "A batch line's body must be a JSON object.", code="invalid_batch_line", param="body"
        )
    body = check_body(body) if api == "responses" else check_fields(body)
    if body.get("stream") is True:
        raise BadRequest(
            "A batch line cannot stream; drop 'stream'.",
            code="invalid_batch_line",
            param="body.stream",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "Missing required parameter: 'model' in the line's body.",
            code="missing_required_parameter",
            param="body.model",
        )
    try:
        decisions = check_tool_policy(tenant_name, tenant, body.get("tools"))  # rewrites MCP
        if body.get("tools") and any(
            isinstance(t, dict) and t.get("model") is not None for t in body["tools"]
        ):
            raise BadRequest(
                "Tools that name a model of their own are not accepted in batch lines.",
                code="invalid_batch_line",
                param="tools",
            )
        targets = snap.router.batch_targets(tenant_name, tenant, model)
        refs = Refs().body(body)
        pinned, _ = await owned(state, tenant_name, refs)
    except GatewayError as exc:
        if exc.param and not exc.param.startswith("body."):
            exc.param = f"body.{exc.param}"
        raise
    target = targets[0]
    if pinned is not None and pinned != target.resource:
        raise BadRequest(
            "The objects this line names live on another Azure resource than the batch "
            f"deployment of '{model}'.",
            code="objects_on_different_resources",
            param="body",
        )
    return {**line, "body": {**body, "model": target.deployment}}, target, model, decisions
