"""Multipart form bodies: find one field's value and replace it, every other byte kept.

The audio and image-edit endpoints name their model in a ``model`` form field; the
gateway reads it, and rewrites only that field's value to the target's deployment.
Files in the same form pass through as the exact bytes the client sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

from .errors import BadRequest

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;]{1,70}))', re.IGNORECASE)
_DISPOSITION = re.compile(rb"(?im)^content-disposition:[ \t]*form-data(.*)$")
_NAME = re.compile(rb';\s*name="([^"]*)"|;\s*name=([^;\s]+)', re.IGNORECASE)
_FILENAME = re.compile(rb";\s*filename\*?=", re.IGNORECASE)


def boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; 400 if there is none."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise BadRequest(
            "This endpoint takes a multipart/form-data body (Content-Type: multipart/form-data; "
            "boundary=...).",
            code="invalid_content_type",
        )
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise BadRequest(
            "The multipart/form-data Content-Type has no boundary parameter.",
            code="invalid_content_type",
        )
    return (m.group(1) or m.group(2)).encode("latin-1")


class Part(NamedTuple):
    """One part of a form: its field name, whether it is a file, where its value is."""

    name: bytes | None
    is_file: bool
    head: tuple[int, int]
    value: tuple[int, int]


def parts(body: bytes, sep: bytes) -> Iterator[Part]:
    """The parts of a multipart body, in order (stops at the closing delimiter)."""
    delim = b"--" + sep
    pos = body.find(delim)
    while pos >= 0:
        start = pos + len(delim)
        if body[start : start + 2] == b"--":
            return  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0:
            return
        value_start = head_end + 4
        end = body.find(b"\r\n" + delim, value_start)
        if end < 0:
            return
        name, is_file = None, False
        disposition = _DISPOSITION.search(body, start, head_end)
        if disposition is not None:
            params = disposition.group(1)
            m = _NAME.search(params)
            name = (m.group(1) or m.group(2)) if m is not None else None
            is_file = _FILENAME.search(params) is not None
        yield Part(name, is_file, (start, head_end), (value_start, end))
        pos = end + 2


def field_span(body: bytes, sep: bytes, name: str) -> tuple[int, int] | None:
    """Where the value of the (non-file) form field ``name`` is in ``body``, or None."""
    want = name.encode()
    for part in parts(body, sep):
        if part.name == want and not part.is_file:
            return part.value
    return None


def field(body: bytes, sep: bytes, name: str) -> str | None:
    """The value of form field ``name`` as text, or None if absent."""
    span = field_span(body, sep, name)
    if span is None:
        return None
    try:
        return body[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(
            f"The form field '{name}' is not UTF-8 text.", code="invalid_value", param=name
        ) from None


def replace(body: bytes, sep: bytes, name: str, value: str) -> bytes:
    """``body`` with form field ``name``'s value replaced (it must be present)."""
    span = field_span(body, sep, name)
    assert span is not None
    return body[: span[0]] + value.encode() + body[span[1] :]
