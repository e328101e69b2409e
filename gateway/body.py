"""The request body as the route reads it: size and idle limits, media types, forms.

JSON bodies are read whole (``server.max_body_bytes``) and parsed strictly
(``validate.parse_json``). Multipart forms are parsed as they arrive with
python-multipart (the parser Starlette uses): text fields are kept, file parts are
spooled (memory, then a temporary file) so that an upload is never held whole in
memory, and the form sent upstream is built anew from the parsed parts with a boundary
of the gateway's: the upstream reads exactly the fields the gateway read. A field the
gateway reads that comes twice, a part without a name, a second Content-Disposition or
a Content-Transfer-Encoding is refused.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from typing import IO, NamedTuple

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive

from .errors import BadRequest, ClientClosed, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

_BODY_IDLE = "the request body stopped arriving"  # the message of the idle timer's cancel
_SPOOL_MEMORY = 1024 * 1024  # file parts beyond this go to a temporary file
_MAX_FIELD = 1024 * 1024  # one text field
_MAX_PARTS = 1000
_PART_TYPE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+(;[ -~]*)?\Z")


class Media(NamedTuple):
    """What a Content-Type says the body is: ``json``, ``form``, ``other`` or ``none``."""

    kind: str
    boundary: bytes | None = None


def media(content_type: str | None) -> Media:
    """Classify a Content-Type (case-insensitive; ``+json`` and ``text/json`` are JSON)."""
    if content_type is None or not content_type.strip():
        return Media("none")
    value, params = parse_options_header(content_type)
    mtype = value.decode("latin-1").strip().lower()
    if mtype in ("application/json", "text/json") or (
        mtype.startswith("application/") and mtype.endswith("+json")
    ):
        return Media("json")
    if mtype == "multipart/form-data":
        sep = params.get(b"boundary")
        if not sep or len(sep) > 70:
            raise BadRequest(
                "The multipart/form-data Content-Type has no usable boundary parameter.",
                code="invalid_content_type",
            )
        return Media("form", sep)
    return Media("other")


def unsupported(content_type: str | None, wants: str) -> UnsupportedMediaType:
    """The 415 for a body whose media type the route does not take."""
    shown = (content_type or "")[:80]
    return UnsupportedMediaType(
        f"Content-Type '{shown}' is not accepted here; send {wants}.",
        code="unsupported_media_type",
    )


async def read_body(
    receive: Receive, limit: int, idle_timeout: float, declared: str | None
) -> bytes:
    """The whole request body, refused past ``limit`` bytes or ``idle_timeout`` of silence."""
    body = bytearray()
    async for chunk in body_chunks(receive, limit, idle_timeout, declared):
        body += chunk
    return bytes(body)


async def body_chunks(
    receive: Receive, limit: int, idle_timeout: float, declared: str | None
) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused past ``limit`` bytes or ``idle_timeout``."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    # The idle timer cancels this task with a message of its own (asyncio.timeout's way,
    # without its context manager per receive: this is every request's path).
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    base = task.cancelling()
    total = 0
    while True:
        timer = loop.call_later(idle_timeout, task.cancel, _BODY_IDLE)
        try:
            message = await receive()
        except asyncio.CancelledError as exc:
            if exc.args == (_BODY_IDLE,) and task.uncancel() <= base:
                raise RequestTimeout(
                    f"The request body stopped arriving for {idle_timeout:g} s; send it whole."
                ) from None
            raise
        finally:
            timer.cancel()
        if message["type"] == "http.disconnect":
            raise ClientClosed("The client disconnected while sending the body.")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class Part:
    """One part of a parsed form: a text field (``value``) or a file (``spool``)."""

    __slots__ = ("content_type", "filename", "name", "size", "spool", "value")

    def __init__(self, name: str, filename: str | None, content_type: str | None) -> None:
        self.name = name
        self.filename = filename
        self.content_type = content_type
        self.value = bytearray()
        self.spool: IO[bytes] | None = None
        self.size = 0
        if filename is not None:
            self.spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.spool is not None:
            self.spool.write(data)
            return
        if self.size > _MAX_FIELD:
            raise PayloadTooLarge(
                f"Form field '{self.name}' exceeds {_MAX_FIELD} bytes; send large content "
                "as a file part.",
                param=self.name,
            )
        self.value += data

    def replace(self, spool: IO[bytes], size: int) -> None:
        """Send ``spool`` (``size`` bytes) instead of the file part as it arrived."""
        if self.spool is not None:
            self.spool.close()
        self.spool = spool
        self.size = size

    def text(self) -> str:
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(
                f"The form field '{self.name}' is not UTF-8 text.",
                code="invalid_value",
                param=self.name,
            ) from None


def _quoted(value: str) -> str:
    """A name or filename as a quoted-string no parser can read two ways (WHATWG rule)."""
    return value.replace("\\", "%5C").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class Form:
    """A parsed multipart form; ``encode`` builds the form sent upstream."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts

    def fields(self) -> list[tuple[str, str]]:
        """(name, text) of every text field, in order."""
        return [(p.name, p.text()) for p in self.parts if p.spool is None]

    def field(self, name: str) -> str | None:
        """The text of field ``name`` (read fields come at most once), or None."""
        for part in self.parts:
            if part.name == name and part.spool is None:
                return part.text()
        return None

    def encode(self, overrides: dict[str, str] | None = None) -> tuple[str, int, Upstream]:
        """(content type, length, body) of the form as sent upstream, with the text of
        the fields in ``overrides`` replaced. The body can be read more than once."""
        sep = "gateway-" + secrets.token_hex(16)
        heads: list[tuple[bytes, Part, bytes | None]] = []
        length = 0
        for part in self.parts:
            head = f'--{sep}\r\nContent-Disposition: form-data; name="{_quoted(part.name)}"'
            if part.filename is not None:
                head += f'; filename="{_quoted(part.filename)}"'
            if part.content_type is not None:
                head += f"\r\nContent-Type: {part.content_type}"
            head_bytes = (head + "\r\n\r\n").encode("utf-8")
            value = None
            if part.spool is None:
                text = (overrides or {}).get(part.name)
                value = text.encode() if text is not None else bytes(part.value)
            heads.append((head_bytes, part, value))
            length += len(head_bytes) + (len(value) if value is not None else part.size) + 2
        tail = f"--{sep}--\r\n".encode()
        length += len(tail)
        return f"multipart/form-data; boundary={sep}", length, Upstream(heads, tail)

    def close(self) -> None:
        for part in self.parts:
            if part.spool is not None:
                part.spool.close()


class Upstream:
    """The rebuilt form's bytes, read anew on every iteration (a retry resends it)."""

    def __init__(self, heads: list[tuple[bytes, Part, bytes | None]], tail: bytes) -> None:
        self.heads = heads
        self.tail = tail

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for head, part, value in self.heads:
            if value is not None:
                yield head + value + b"\r\n"
                continue
            yield head
            assert part.spool is not None
            part.spool.seek(0)
            while chunk := part.spool.read(256 * 1024):
                yield chunk
            yield b"\r\n"
        yield self.tail


class _FormReader:
    """python-multipart's callbacks, collecting the parts of one form."""

    def __init__(self, read: frozenset[str]) -> None:
        self.read = read
        self.parts: list[Part] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.field = bytearray()
        self.value = bytearray()
        self.current: Part | None = None
        self.done = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.headers.clear,
            "on_header_field": lambda d, s, e: self.field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self.value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda d, s, e: self._data(d[s:e]),
            "on_end": self._end,
        }

    def _header_end(self) -> None:
        self.headers.append((bytes(self.field).lower(), bytes(self.value)))
        self.field.clear()
        self.value.clear()

    def _headers_finished(self) -> None:
        self.current = _new_part(self.headers, self.parts, self.read)
        self.parts.append(self.current)

    def _data(self, data: bytes) -> None:
        assert self.current is not None
        self.current.write(data)

    def _end(self) -> None:
        self.done = True


async def read_form(
    chunks: AsyncIterator[bytes], boundary: bytes, read: frozenset[str], limit: int
) -> Form:
    """Parse a multipart body as it arrives; refuse what could be read two ways.

    ``read`` names the fields the gateway reads: each may come once, as text only.
    """
    reader = _FormReader(read)
    parser = MultipartParser(boundary, reader.callbacks(), max_size=limit)  # type: ignore[arg-type]
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
        if not reader.done:
            raise BadRequest(
                "The multipart/form-data body ends before its closing boundary.",
                code="invalid_form",
            )
    except MultipartParseError as exc:
        Form(reader.parts).close()
        raise BadRequest(
            f"The multipart/form-data body is malformed ({exc}).", code="invalid_form"
        ) from None
    except BaseException:
        Form(reader.parts).close()
        raise
    return Form(reader.parts)


def _new_part(headers: list[tuple[bytes, bytes]], parts: list[Part], read: frozenset[str]) -> Part:
    if len(parts) >= _MAX_PARTS:
        raise BadRequest(f"The form has more than {_MAX_PARTS} parts.", code="invalid_form")
    names = [k for k, _ in headers]
    if names.count(b"content-disposition") != 1 or names.count(b"content-type") > 1:
        raise BadRequest(
            "Each form part needs exactly one Content-Disposition (and at most one "
            "Content-Type) header.",
            code="invalid_form",
        )
    if b"content-transfer-encoding" in names:
        raise BadRequest(
            "Form parts with a Content-Transfer-Encoding are not accepted; send the bytes "
            "as they are.",
            code="invalid_form",
        )
    disposition = dict(headers)[b"content-disposition"]
    kind, params = parse_options_header(disposition)
    raw_name = params.get(b"name")
    if kind.lower() != b"form-data" or raw_name is None or b"filename*" in params:
        raise BadRequest(
            "Each form part needs 'Content-Disposition: form-data; name=\"...\"' (and no "
            "filename*).",
            code="invalid_form",
        )
    try:
        name = raw_name.decode("utf-8")
        filename = params[b"filename"].decode("utf-8") if b"filename" in params else None
    except UnicodeDecodeError:
        raise BadRequest("A form part's name is not UTF-8.", code="invalid_form") from None
    ctype = dict(headers).get(b"content-type")
    content_type = ctype.decode("latin-1").strip() if ctype is not None else None
    if content_type is not None and not _PART_TYPE.match(content_type):
        raise BadRequest(
            f"Form part '{name}' has an unusable Content-Type.", code="invalid_form", param=name
        )
    if name.lower() in read and name not in read:
        raise BadRequest(
            f"Form field '{name}' differs from '{name.lower()}' only in case; use "
            f"'{name.lower()}'.",
            code="invalid_key_case",
            param=name,
        )
    if name in read:
        if filename is not None:
            raise BadRequest(
                f"Form field '{name}' must be a text field, not a file.",
                code="invalid_form",
                param=name,
            )
        if any(p.name == name for p in parts):
            raise BadRequest(
                f"Form field '{name}' is sent more than once; send it once (form parsers "
                "disagree on which copy counts).",
                code="duplicate_field",
                param=name,
            )
    return Part(name, filename, content_type)
