"""A read-only side tap on a Server-Sent Events byte stream.

The relay forwards the upstream bytes untouched; this module only reads a copy
to learn the response id, the final usage and the items observers care about.
Delta events (the bulk of a stream) are recognised by a prefix check and never
JSON-decoded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from .validate import dump_json, parse_upstream

log = logging.getLogger("gateway.sse")

Event = dict[str, Any]

FINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ID_TYPES = frozenset({"response.created", "response.queued", "response.in_progress"})
_MAX_PENDING = 64 * 1024 * 1024
_CHAT_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_SEQUENCE = re.compile(rb'"sequence_number"[ :]*(\d{1,19})(?!\d)')


class SseTap:
    """Parses SSE events out of chunks fed to it; never alters the chunks."""

    def __init__(
        self,
        on_event: Callable[[Event], None] | None = None,
        kind: str = "responses",
        finals: frozenset[str] = FINAL_TYPES,
    ) -> None:
        # "responses": Responses events; "chat": chat-completions chunks ending in
        # ``[DONE]``; "other" (audio, image streams): only a top-level ``usage`` is read.
        self._kind = kind
        self._finals = finals
        self.final_output: list[Any] | None = None
        self._pending = bytearray()
        self._data: list[bytes] = []
        self._on_event = on_event
        self.disabled = False
        self.response_id: str | None = None
        self.usage: dict[str, Any] | None = None
        self.final_type: str | None = None
        self._sequence: int | None = None
        self._undecoded: bytes | None = None  # the last delta's data, sequence not read yet
        self.events = 0

    @property
    def last_sequence(self) -> int | None:
        """The ``sequence_number`` of the last event (a delta's is read only when asked)."""
        if self._undecoded is not None:
            data, self._undecoded = self._undecoded, None
            at = data.rfind(b'"sequence_number"')
            if at >= 0 and (found := _SEQUENCE.match(data, at)) is not None:
                self._sequence = int(found.group(1))
        return self._sequence

    def feed(self, chunk: bytes) -> None:
        """Read one chunk of the stream."""
        if self.disabled:
            return
        # The bulk of a Responses stream: a chunk that is one whole delta event,
        # ``event: response.….delta\ndata: {"type":"response.….delta",…}\n\n``, told
        # from its ``event:`` line and the start of its data; nothing split or decoded.
        if (
            chunk.endswith(b"\n\n")
            and chunk.startswith(b"event: ")
            and not self._pending
            and not self._data
            and chunk.count(b"\n") == 3
        ):
            nl = chunk.find(b"\n")
            if (
                chunk.endswith(b".delta", 7, nl)
                and chunk.startswith(b"data: ", nl + 1)
                and b'.delta"' in chunk[nl + 7 : nl + 87]
                and self._kind == "responses"
            ):
                self.events += 1
                self._undecoded = chunk
                return
        if not self._pending and chunk.endswith(b"\n"):
            lines = chunk[:-1].split(b"\n")  # the usual chunk: whole lines, nothing held
        else:
            self._pending += chunk
            end = self._pending.rfind(b"\n")
            if end < 0:
                if len(self._pending) > _MAX_PENDING:
                    self._give_up("an SSE line exceeded 64 MiB")
                return
            lines = bytes(self._pending[:end]).split(b"\n")
            del self._pending[: end + 1]
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)

    def close(self) -> None:
        """End of stream: dispatch a last event that lacked its blank line."""
        if not self.disabled and self._pending:
            self.feed(b"\n")
        if self._data:
            self._dispatch()

    def _give_up(self, why: str) -> None:
        log.warning("sse tap disabled", extra={"reason": why})
        self.disabled = True
        self._pending.clear()
        self._data.clear()

    def _dispatch(self) -> None:
        if not self._data:
            return
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        self.events += 1
        if self._kind != "responses":
            self._chat_chunk(data)
            return
        if b'.delta"' in data[:80]:
            self._undecoded = data
            return
        event = parse_upstream(data)
        if isinstance(event, dict):
            self.observe(event)

    def _chat_chunk(self, data: bytes) -> None:
        """A chat chunk (or another API's event): only ``[DONE]`` and ``usage`` matter."""
        if data.strip() == b"[DONE]":
            self.final_type = "[DONE]"
            return
        if not _CHAT_USAGE.search(data):
            return
        chunk = parse_upstream(data)
        if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]

    def observe(self, event: Event) -> None:
        """Take note of one decoded event."""
        seq = event.get("sequence_number")
        if isinstance(seq, int):
            self._sequence, self._undecoded = seq, None
        etype = event.get("type")
        response = event.get("response")
        if isinstance(response, dict):
            if etype in _ID_TYPES and isinstance(response.get("id"), str):
                self.response_id = self.response_id or response["id"]
            if etype in self._finals:
                self.final_type = etype
                usage = response.get("usage")
                if isinstance(usage, dict):
                    self.usage = usage
                output = response.get("output")
                if isinstance(output, list):
                    self.final_output = output
        if self._on_event is not None:
            self._on_event(event)


def stream_error_event(code: str, message: str, sequence: int | None) -> bytes:
    """A closing SSE ``error`` event, so SDKs raise instead of seeing a silent end."""
    event = {
        "type": "error",
        "code": code,
        "message": message,
        "param": None,
        "sequence_number": sequence,
    }
    return b"\nevent: error\ndata: " + dump_json(event) + b"\n\n"


def chat_error_chunk(code: str, message: str) -> bytes:
    """A closing ``data: {"error": ...}`` chunk, which the SDKs raise for chat streams."""
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return b"\ndata: " + dump_json({"error": error}) + b"\n\n"
