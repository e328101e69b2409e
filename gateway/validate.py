"""Strict JSON and type checks of exactly the request fields the gateway reads.

Fields the gateway does not read pass through untouched for Azure to judge. What it
does read is checked before it is read, so a wrong type is a 400 ``invalid_type``
naming the param path (``tools[2].type``), never a crash further down.

Strict JSON means: UTF-8, no ``NaN``/``Infinity``, no lone surrogates (escaped or
raw), and no nesting deeper than ``max_depth`` (``server.max_json_depth``).
Duplicate keys resolve last-wins, and the gateway forwards the body it parsed, so
Azure sees exactly one value: the one that was checked.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from .errors import BadRequest

# orjson turns integers beyond 64 bits into floats; bodies with such digit runs take
# the standard parser, which keeps them exact.
_LONG_NUMBER = re.compile(rb"\d{20}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BAD_HEADER_VALUE = re.compile(rb"[^\t\x20-\x7e]")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def invalid_type(param: str, expected: str, value: Any) -> BadRequest:
    """The 400 for a field of the wrong JSON type."""
    return BadRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
        code="invalid_type",
        param=param,
    )


def _invalid_json(why: str) -> BadRequest:
    return BadRequest(f"Request body is not valid JSON: {why}.", code="invalid_json")


def _reject_constant(name: str) -> Any:
    raise _invalid_json(f"{name} is not a JSON number")


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def parse_json(raw: bytes, max_depth: int) -> Any:
    """Parse a request body strictly, or raise a 400 that says what is wrong."""
    if _LONG_NUMBER.search(raw):
        try:
            value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise _invalid_json("it is not UTF-8") from None
        except RecursionError:
            raise _invalid_json(f"it is nested deeper than {max_depth} levels") from None
        except json.JSONDecodeError as exc:
            raise _invalid_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
        if _has_surrogate(value):
            raise _invalid_json("a string holds a lone UTF-16 surrogate")
    else:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "depth limit" in exc.msg:
                raise _invalid_json(f"it is nested deeper than {max_depth} levels") from None
            raise _invalid_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    # A body cannot nest deeper than it has brackets: most bodies skip the walk.
    if (
        raw.count(b"[") + raw.count(b"{") > max_depth
        and isinstance(value, dict | list)
        and _depth_exceeds(value, max_depth)
    ):
        raise _invalid_json(f"it is nested deeper than {max_depth} levels")
    return value


def parse_upstream(raw: bytes) -> Any:
    """Parse an upstream body leniently (it is Azure's answer, relayed as is); None if not JSON.

    Strictness is for what clients send; what Azure sends must still be read for
    usage, ids and audit, lone surrogates and huge integers included.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def dump_json(value: Any) -> bytes:
    """Serialise a parsed (possibly rewritten) body; exact for integers of any size."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, kept exact by the standard parser
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    """Refuse header values that are not printable ASCII (they cannot be forwarded as sent)."""
    if not _BAD_HEADER_VALUE.search(b"\t".join([v for _, v in headers])):
        return  # one scan for the common case; find the culprit only when there is one
    for name, value in headers:
        if _BAD_HEADER_VALUE.search(value):
            label = name.decode("latin-1")
            raise BadRequest(
                f"Header '{label}' has a value with non-ASCII or control characters; "
                "send printable ASCII only.",
                code="invalid_header",
                param=label,
            )


def _str(value: Any, param: str) -> None:
    if value is not None and not isinstance(value, str):
        raise invalid_type(param, "a string", value)


def _bool(value: Any, param: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(param, "an object", value)
    return value


def _list(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    return value


def _tool(tool: Any, param: str) -> None:
    tool = _object(tool, param)
    if not isinstance(tool.get("type"), str):
        raise invalid_type(f"{param}.type", "a string", tool.get("type"))
    for name in ("model", "server_url", "server_label", "connector_id"):
        _str(tool.get(name), f"{param}.{name}")
    headers = tool.get("headers")
    if headers is not None:
        for key, value in _object(headers, f"{param}.headers").items():
            _str(value, f"{param}.headers.{key}")
    approval = tool.get("require_approval")
    if approval is not None and not isinstance(approval, str | dict):
        raise invalid_type(f"{param}.require_approval", "a string or an object", approval)
    allowed = tool.get("allowed_tools")
    if allowed is not None and not isinstance(allowed, list | dict):
        raise invalid_type(f"{param}.allowed_tools", "an array or an object", allowed)


_MCP_ITEM_STRINGS = ("server_label", "name", "approval_request_id", "reason", "status")


def _item(item: Any, param: str) -> None:
    item = _object(item, param)
    kind = item.get("type")
    _str(kind, f"{param}.type")
    _str(item.get("id"), f"{param}.id")
    if kind == "mcp_approval_response":
        _bool(item.get("approve"), f"{param}.approve")
    if isinstance(kind, str) and kind.startswith("mcp_"):
        for name in _MCP_ITEM_STRINGS:
            _str(item.get(name), f"{param}.{name}")
        if item.get("tools") is not None:
            for i, t in enumerate(_list(item["tools"], f"{param}.tools")):
                _str(_object(t, f"{param}.tools[{i}]").get("name"), f"{param}.tools[{i}].name")


def check_fields(body: Any) -> dict[str, Any]:
    """Type-check the fields of another endpoint's JSON body that the gateway reads."""
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    _str(body.get("model"), "model")
    _bool(body.get("stream"), "stream")
    tools = body.get("tools")
    if tools is not None:
        for i, tool in enumerate(_list(tools, "tools")):
            _object(tool, f"tools[{i}]")
    return body


def check_body(body: Any) -> dict[str, Any]:
    """Type-check the fields of a create/compact body that the gateway reads."""
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    _str(body.get("model"), "model")
    for name in ("stream", "background", "store"):
        _bool(body.get(name), name)
    _str(body.get("previous_response_id"), "previous_response_id")
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        _str(conversation.get("id"), "conversation.id")
    elif conversation is not None and not isinstance(conversation, str):
        raise invalid_type("conversation", "a string or an object", conversation)
    tools = body.get("tools")
    if tools is not None:
        for i, tool in enumerate(_list(tools, "tools")):
            _tool(tool, f"tools[{i}]")
    items = body.get("input")
    if isinstance(items, list):
        for i, item in enumerate(items):
            _item(item, f"input[{i}]")
    elif items is not None and not isinstance(items, str):
        raise invalid_type("input", "a string or an array", items)
    include = body.get("include")
    if include is not None:
        for i, name in enumerate(_list(include, "include")):
            _str(name, f"include[{i}]")
    return body
