"""The batch-file transport: a ``purpose=batch`` upload, each line through the rulebook.

Each JSONL line is ``{"custom_id", "method": "POST", "url", "body"}`` and Azure runs its
``body`` against its ``url`` on the batch deployment the body's ``model`` names. So every
line's body goes through ``checks.check`` as the request it is (its endpoint's type
checks, ids, tool and MCP policy with the ``require_approval`` rewrite, ownership, the
allowlist and region pin; ``model`` becomes the batch deployment, ``batch: true`` in the
model's targets); this module only reads the envelope (the line's four fields). A bad line
fails the upload with the status that request would get, ``line N:`` before its message
and its ``param``; nothing is stored upstream. All lines must resolve to one batch
deployment (Azure runs a file on one). What is uploaded is the file rebuilt from the
checked lines (the gateway's serialisation), spooled like any upload: the file is read
from its spool one line at a time, never held whole.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

from .body import Part
from .checks import Checked, Request, check
from .errors import BadRequest, GatewayError, PayloadTooLarge
from .keys import Principal
from .routing import Target
from .runtime import Gateway, Snapshot
from .validate import dump_json, parse_json

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
    # The lines with MCP content, for the audit trail: (line, custom_id, the checked line).
    mcp: list[tuple[int, str, Checked]]
    # The guardrail verdicts of the lines, for the audit trail: (line, custom_id, records).
    verdicts: list[tuple[int, str, list[dict[str, Any]]]] = field(default_factory=list)


def _at(line: int, exc: GatewayError) -> GatewayError:
    """``exc`` as the error of line ``line`` of the file."""
    out = copy.copy(exc)  # every field its class carries (a content filter's result too)
    out.message = f"line {line}: {exc.message}"
    out.args = (out.message,)
    out.param = f"line {line}: {exc.param}" if exc.param else f"line {line}"
    return out


async def check_batch_file(
    gw: Gateway, snap: Snapshot, principal: Principal, part: Part
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
    mcp: list[tuple[int, str, Checked]] = []
    verdicts: list[tuple[int, str, list[dict[str, Any]]]] = []
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
                line, checked, records = await _check_line(gw, snap, principal, text)
            except GatewayError as exc:
                raise _at(number, exc) from None
            target, model = checked.plans[0].target, checked.model or ""
            if checked.mcp:
                mcp.append((number, line["custom_id"], checked))
            if records:
                verdicts.append((number, line["custom_id"], records))
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
            data = checked.plans[0].payload or b""
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
    return BatchFile(chosen, model_of_file, count, estimated, out, size, mcp, verdicts)


async def _check_line(
    gw: Gateway, snap: Snapshot, principal: Principal, text: bytes
) -> tuple[dict[str, Any], Checked, list[dict[str, Any]]]:
    """One line's envelope read, its body through the rulebook: (the line, the checked
    request, whose one plan renders the line to upload, its guardrail verdicts)."""
    line = parse_json(text, snap.loaded.config.server.max_json_depth)
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

    def render(checked_body: dict[str, Any]) -> bytes:
        return dump_json({**line, "body": checked_body}) + b"\n"

    request = Request(api=api, body=body, batch=True, render=render)
    records: list[dict[str, Any]] = []
    try:
        checked = await check(gw, snap, principal, request)
        if gw.guard is not None:  # the line's prompts and documents, as for a request
            records = await gw.guard.check_request(
                checked.tenant_name, checked.tenant, checked.body
            )
    except GatewayError as exc:
        if exc.param and not exc.param.startswith("body."):
            exc.param = f"body.{exc.param}"
        raise
    return line, checked, records
