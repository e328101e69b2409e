"""MCP audit trail: records of every MCP tool, approval and call, secrets redacted.

Request-side records (tools offered, approval responses, MCP items passed back as
input) are durable before the request is forwarded. Response-side records
(``mcp_list_tools``, ``mcp_call``, ``mcp_approval_request``) are written as the items
are seen, from JSON bodies and from streams.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .audit_sinks import AuditWriteError, Sink
from .errors import ServiceUnavailable
from .exchange import Exchange, new_request_id
from .sse import FINAL_TYPES

log = logging.getLogger("gateway.audit")

Record = dict[str, Any]
REDACTED = "[REDACTED]"
_RESPONSE_ITEMS = {
    "mcp_list_tools": "mcp.list_tools",
    "mcp_call": "mcp.call",
    "mcp_approval_request": "mcp.approval_request",
}


_SURROGATES = re.compile("[\ud800-\udfff]")
# Fields written by the gateway itself, never client- or model-chosen text.
_OWN_FIELDS = frozenset(
    {"ts", "request_id", "tenant", "key_id", "event", "source", "resource", "region"}
)


def _escape(text: str) -> str:
    """``text`` with lone surrogates spelled out (``\\udc80``) so it always encodes."""
    if not _SURROGATES.search(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def redact_url(value: Any) -> Any:
    """A URL with its userinfo and query values blanked (tokens often travel there)."""
    if not isinstance(value, str):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{name}={REDACTED}" if sep else name
        for name, sep, _ in (p.partition("=") for p in parts.query.split("&") if p)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class Redactor:
    """Blanks values whose keys look like secrets, and cuts long text."""

    def __init__(self, secret_keys: Iterable[str], max_chars: int) -> None:
        words = "|".join(re.escape(k.lower()) for k in secret_keys)
        self._secret = re.compile(f"({words})", re.I)
        self.max_chars = max_chars

    def value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: REDACTED if self._secret.search(str(k)) else self.value(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value

    def record(self, record: Record) -> Record:
        """The record as written: every free-text field escaped and capped like arguments."""
        out: Record = {}
        for key, value in record.items():
            if (
                key in _OWN_FIELDS
                or key.endswith("_sha256")
                or value is None
                or isinstance(value, bool | int | float)
            ):
                out[key] = value
                continue
            raw = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            text = _escape(raw)
            if len(text) > self.max_chars:
                out[f"{key}_length"] = len(text)
                out[f"{key}_sha256"] = hashlib.sha256(text.encode()).hexdigest()
                out[f"{key}_truncated"] = True
                out[key] = text[: self.max_chars]
            else:  # structured values stay structured unless they needed escaping
                out[key] = text if isinstance(value, str) or text is not raw else value
        return out

    def text(self, record: Record, field: str, value: Any) -> None:
        """Put ``value`` (a JSON string or text) into ``record[field]``, redacted and cut."""
        if value is None:
            record[field] = None
            return
        raw = value if isinstance(value, str) else json.dumps(value)
        try:
            parsed = json.loads(raw)
            clean = json.dumps(self.value(parsed), ensure_ascii=False)
        except ValueError:
            clean = raw
        if len(clean) > self.max_chars:
            raw = _escape(raw)
            record[f"{field}_length"] = len(raw)
            record[f"{field}_sha256"] = hashlib.sha256(raw.encode()).hexdigest()
            record[f"{field}_truncated"] = True
            clean = clean[: self.max_chars]
        record[field] = clean


def _server(item: dict[str, Any]) -> Record:
    return {
        "server_label": item.get("server_label"),
        "server_url": redact_url(item.get("server_url")),
        "connector_id": item.get("connector_id"),
        **({"tunnel_id": item["tunnel_id"]} if item.get("tunnel_id") is not None else {}),
    }


class Auditor:
    """Builds audit records and writes them to every sink."""

    def __init__(
        self,
        sinks: list[Sink],
        redactor: Redactor,
        *,
        on_failure: str = "reject",
        on_record: Callable[[Exchange, Record], None] | None = None,
        on_write_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.sinks = sinks
        self.redactor = redactor
        self.on_failure = on_failure
        self._on_record = on_record
        self._on_write_failure = on_write_failure

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def base(self, ex: Exchange, event: str) -> Record:
        """The fields every record of an exchange carries (who, where, when)."""
        return self._base(ex, event)

    def _base(self, ex: Exchange, event: str) -> Record:
        now = time.time()
        return {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1000) % 1000:03d}Z",
            **ex.who_and_where(),
            "client_addr": ex.client,
            "event": event,
            "response_id": ex.response_id,
            "previous_response_id": ex.previous_response_id,
        }

    def request_records(
        self,
        ex: Exchange,
        tools: list[tuple[str, list[Any]]],
        items: list[tuple[str, dict[str, Any]]],
        decisions: list[Record],
    ) -> list[Record]:
        """Records for the MCP content of a request: the policy's rewrites, every MCP tool
        of every tool list it carries, every MCP item it passes (approvals, replays)."""
        redact = self.redactor.value
        out = [
            {
                **self._base(ex, "mcp.policy"),
                **d,
                "server_url": redact_url(d.get("server_url")),
                "from": redact(d.get("from")),
            }
            for d in decisions
        ]
        for _, listed in tools:
            for tool in listed:
                if not isinstance(tool, dict) or tool.get("type") != "mcp":
                    continue
                headers = tool.get("headers")
                rec = {
                    **self._base(ex, "mcp.tool"),
                    **_server(tool),
                    "require_approval": redact(tool.get("require_approval")),
                    "allowed_tools": redact(tool.get("allowed_tools")),
                    "header_names": sorted(headers) if isinstance(headers, dict) else [],
                    "authorization_set": bool(tool.get("authorization")),
                }
                out.append(rec)
        for _, item in items:
            if item.get("type") == "mcp_approval_response":
                out.append(
                    {
                        **self._base(ex, "mcp.approval"),
                        "approval_request_id": item.get("approval_request_id"),
                        "approve": item.get("approve"),
                        "reason": item.get("reason"),
                        "item_id": item.get("id"),
                    }
                )
            else:
                out.append(self.item_record(ex, item, source="input"))
        return out

    def item_record(self, ex: Exchange, item: dict[str, Any], source: str = "response") -> Record:
        """The record of one MCP output item."""
        kind = item["type"]
        rec: Record = {
            **self._base(ex, _RESPONSE_ITEMS[kind]),
            "source": source,
            "item_id": item.get("id"),
            "server_label": item.get("server_label"),
        }
        if kind == "mcp_list_tools":
            tools = item.get("tools")
            listed = tools if isinstance(tools, list) else []
            rec["tools"] = [t.get("name") for t in listed if isinstance(t, dict)]
            if item.get("error") is not None:
                self.redactor.text(rec, "error", item.get("error"))
        else:
            rec["name"] = item.get("name")
            self.redactor.text(rec, "arguments", item.get("arguments"))
        if kind == "mcp_call":
            rec["approval_request_id"] = item.get("approval_request_id")
            rec["status"] = item.get("status")
            self.redactor.text(rec, "output", item.get("output"))
            # older payloads carry a string error, newer ones an object
            self.redactor.text(rec, "error", item.get("error"))
        return rec

    def response_records(self, ex: Exchange, output: Any) -> list[Record]:
        """Records for the MCP items of a response's ``output``."""
        return [
            self.item_record(ex, item)
            for item in (output if isinstance(output, list) else [])
            if isinstance(item, dict) and item.get("type") in _RESPONSE_ITEMS
        ]

    def stream_records(self, ex: Exchange, event: dict[str, Any]) -> list[Record]:
        """Records for one stream event: each MCP item once, when it is done."""
        etype = event.get("type")
        if etype == "response.output_item.done":
            items = [event.get("item")]
        elif (etype in FINAL_TYPES or etype == "response.done") and isinstance(
            event.get("response"), dict
        ):  # response.done: Realtime's end of a response
            items = event["response"].get("output") or []
        else:
            return []
        out = []
        for item in items:
            if isinstance(item, dict) and item.get("type") in _RESPONSE_ITEMS:
                key = str(item.get("id"))
                if key not in ex.audited_items:
                    ex.audited_items.add(key)
                    out.append(self.item_record(ex, item))
        return out

    async def write(self, ex: Exchange, records: list[Record], *, before_forward: bool) -> None:
        """Write ``records`` to every sink; on failure reject (503) or allow, per config."""
        if not records or not self.sinks:
            return
        records = [self.redactor.record(rec) for rec in records]
        for rec in records:
            if self._on_record:
                self._on_record(ex, rec)
        failed = []
        for sink in self.sinks:
            try:
                await sink.write(records)
            except AuditWriteError as exc:
                failed.append(sink.name)
                if self._on_write_failure:
                    self._on_write_failure(sink.name)
                log.error(
                    "audit write failed",
                    extra={
                        "request_id": ex.request_id,
                        "sink": sink.name,
                        "reason": str(exc),
                        "records": len(records),
                    },
                )
        if failed and before_forward and self.on_failure == "reject":
            raise ServiceUnavailable(
                "The gateway could not write its MCP audit record, so the request was not "
                "forwarded. Retry later.",
                code="audit_unavailable",
            )

    async def event(self, event: str, fields: Record, *, required: bool) -> None:
        """A record of the gateway's own (an admin action, a config reload) in the chain;
        ``required``: a record that cannot be written refuses the action (503)."""
        if not self.sinks:
            return
        ex = Exchange(request_id=new_request_id(), operation=event, method="-")
        now = time.time()
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1000) % 1000:03d}Z",
            "request_id": ex.request_id,
            "event": event,
            **fields,
        }
        await self.write(ex, [record], before_forward=required)

    async def aclose(self) -> None:
        for sink in self.sinks:
            await sink.aclose()
