"""Structured JSON logging, and the access log observer."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .exchange import BaseObserver, Exchange

_STD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str)


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


class AccessLog(BaseObserver):
    """One log line per request; never bodies, keys or tokens."""

    def finished(self, ex: Exchange) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        usage = ex.usage or {}
        access_log.info(
            "request",
            extra={
                **ex.who_and_where(),
                "operation": ex.operation,
                "method": ex.method,
                "status": ex.status,
                "error_code": ex.error_code,
                "stream": ex.stream,
                "duration_ms": round((ex.duration_seconds or 0) * 1000, 3),
                "ttfb_ms": round(ex.ttfb_seconds * 1000, 3) if ex.ttfb_seconds else None,
                "input_tokens": usage.get("input_tokens"),
                "output_tokens": usage.get("output_tokens"),
                "total_tokens": usage.get("total_tokens"),
                "response_id": ex.response_id,
                "upstream_request_id": ex.upstream_request_id,
                "attempts": ex.attempts,
                "interrupted": ex.interrupted,
            },
        )
