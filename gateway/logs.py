"""Structured JSON logging, and the access log observer."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import orjson

from .exchange import BaseObserver, Exchange

_STD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colour codes
}


def _ts(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + (
        f".{int(created * 1000) % 1000:03d}Z"
    )


def _dumps(out: dict[str, Any]) -> str:
    try:
        return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # lone surrogates or integers beyond 64 bits, from upstream values
        return json.dumps(out, default=str, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["traceback"] = self.formatException(record.exc_info)
        return _dumps(out)


def setup_logging(level: str = "INFO") -> None:
    """Send every log line to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


access_log = logging.getLogger("gateway.access")


def _direct_handlers() -> list[logging.StreamHandler[Any]] | None:
    """The handlers an access line reaches, if they are all plain JSON stream handlers."""
    if access_log.handlers or access_log.filters or not access_log.propagate:
        return None
    root = logging.getLogger()
    if root.filters:
        return None
    handlers = root.handlers
    for h in handlers:
        if (
            type(h) is not logging.StreamHandler
            or type(h.formatter) is not JsonFormatter
            or h.filters
            or h.level > logging.INFO
        ):
            return None
    return handlers  # type: ignore[return-value]


class AccessLog(BaseObserver):
    """One log line per request; never bodies, keys or tokens.

    When the line would only reach the gateway's own JSON stream handlers, it is
    serialised and written directly (the same JSON ``JsonFormatter`` makes), skipping
    ``logging``'s record machinery; otherwise it goes through ``logging``.
    """

    def finished(self, ex: Exchange) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        fields = self.fields(ex)
        handlers = _direct_handlers()
        if handlers is None:
            access_log.info("request", extra=fields)
            return
        line = _dumps(
            {
                "ts": _ts(time.time()),
                "level": "info",
                "logger": access_log.name,
                "msg": "request",
                **fields,
            }
        )
        for h in handlers:
            h.acquire()
            try:
                h.stream.write(line + h.terminator)
                h.flush()
            finally:
                h.release()

    @staticmethod
    def fields(ex: Exchange) -> dict[str, Any]:
        """The fields of one access line."""
        usage = ex.usage or {}
        kinds = ex.usage_kinds() or {}
        return {
            **ex.who_and_where(),
            "client_addr": ex.client,
            "operation": ex.operation,
            "method": ex.method,
            "status": ex.status,
            "error_code": ex.error_code,
            "stream": ex.stream,
            "duration_ms": round((ex.duration_seconds or 0) * 1000, 3),
            "ttfb_ms": round(ex.ttfb_seconds * 1000, 3) if ex.ttfb_seconds else None,
            "input_tokens": kinds.get("input"),
            "output_tokens": kinds.get("output"),
            "total_tokens": usage.get("total_tokens"),
            "response_id": ex.response_id,
            "upstream_request_id": ex.upstream_request_id,
            "attempts": ex.attempts,
            "interrupted": ex.interrupted,
            "cost": round(ex.cost, 9) if ex.cost is not None else None,
            "currency": ex.currency,
            **({"path": ex.path} if ex.path else {}),
            **({"transport": ex.transport} if ex.transport != "http" else {}),
            **({"actor": ex.actor} if ex.actor else {}),
            "cost_estimated": ex.cost_estimated if ex.cost is not None else None,
        }
