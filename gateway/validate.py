"""Strict JSON and type checks of exactly the request fields the gateway reads.

Fields the gateway does not read pass through untouched for Azure to judge. What it
does read is checked before it is read, so a wrong type is a 400 ``invalid_type``
naming the param path (``tools[2].type``), never a crash further down.

Strict JSON means: UTF-8, no ``NaN``/``Infinity``, no lone surrogates (escaped or
raw), no nesting deeper than ``max_depth`` (``server.max_json_depth``), no integer
beyond 64 bits, and no duplicate keys (a 400 ``duplicate_key`` naming the path): an
upstream parser that keeps the first value would read what the gateway never checked.
The gateway forwards its own serialisation of what it parsed, never the client's bytes.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from .errors import BadRequest

# orjson turns integers beyond 64 bits into floats; bodies with such digit runs take
# the standard parser, which refuses them (they cannot be forwarded exactly).
_LONG_NUMBER = re.compile(rb"\d{19}")
# A colon written as an escape inside a string: the member count below cannot see it.
_ESCAPED_COLON = re.compile(rb"\\u003[aA]")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
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


def _big_int(text: str) -> int:
    value = int(text) if len(text) <= 21 else _INT_MAX + 1
    if not _INT_MIN <= value <= _INT_MAX:
        raise BadRequest(
            f"Request body holds the integer {text[:24]}{'…' if len(text) > 24 else ''}, "
            "which is beyond 64 bits; send a smaller number.",
            code="number_out_of_range",
        )
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _stdlib(raw: bytes, max_depth: int, pairs: bool) -> Any:
    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_int=_big_int,
            object_pairs_hook=_no_duplicates if pairs else None,
        )
    except UnicodeDecodeError:
        raise _invalid_json("it is not UTF-8") from None
    except RecursionError:
        raise _invalid_json(f"it is nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise _invalid_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _DuplicateKey as exc:
        where = _duplicate_path(raw, exc.key)
        param = f"{where}.{_shown(exc.key)}" if where else _shown(exc.key)
        raise BadRequest(
            f"Request body has the key '{param}' more than once; send each key once (JSON "
            "parsers disagree on which copy counts).",
            code="duplicate_key",
            param=param,
        ) from None


def _shown(key: str) -> str:
    return key[:64].encode("unicode_escape").decode("ascii")


def _duplicate_path(raw: bytes, key: str) -> str:
    """The path of the first object holding ``key`` twice ("" at the top level)."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_Pairs)
    except ValueError:
        return ""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, _Pairs):
            if [k for k, _ in node.pairs].count(key) > 1:
                return where
            stack.extend((v, f"{where}.{k}" if where else k) for k, v in reversed(node.pairs))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(node))))
    return ""


class _Pairs:
    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def _counts(value: Any) -> tuple[int, int]:
    """(object members, colons inside strings) of a parsed value, keys included."""
    members = colons = 0
    stack = [value]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        node = pop()
        if isinstance(node, str):
            colons += node.count(":")
        elif isinstance(node, dict):
            members += len(node)
            for key, child in node.items():
                colons += key.count(":")
                if isinstance(child, str):
                    colons += child.count(":")
                elif isinstance(child, dict | list):
                    push(child)
        elif isinstance(node, list):
            extend(node)
    return members, colons


def parse_json(raw: bytes, max_depth: int) -> Any:
    """Parse a request body strictly, or raise a 400 that says what is wrong."""
    if _LONG_NUMBER.search(raw):
        value = _stdlib(raw, max_depth, pairs=True)
        if _has_surrogate(value):
            raise _invalid_json("a string holds a lone UTF-16 surrogate")
    else:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "depth limit" in exc.msg:
                raise _invalid_json(f"it is nested deeper than {max_depth} levels") from None
            raise _invalid_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
        if isinstance(value, dict | list):
            # Every member of every object has exactly one colon outside strings: fewer
            # members parsed than such colons means a key came twice (orjson keeps the last).
            members, inside = _counts(value)
            if members != raw.count(b":") - inside or _ESCAPED_COLON.search(raw):
                _stdlib(raw, max_depth, pairs=True)  # raises duplicate_key if there is one
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
    return body


def check_tools(lists: list[tuple[str, list[Any]]]) -> None:
    """Type-check every tool of every tool list a request carries (found by its walk)."""
    for param, tools in lists:
        for i, tool in enumerate(tools):
            _tool(tool, f"{param}[{i}]")


def check_event(event: Any) -> dict[str, Any]:
    """Type-check the fields of a Realtime client event that the gateway reads."""
    if not isinstance(event, dict):
        raise BadRequest("A client event must be a JSON object.", code="invalid_event")
    if not isinstance(event.get("type"), str):
        raise invalid_type("type", "a string", event.get("type"))
    _str(event.get("event_id"), "event_id")
    for name in ("session", "response", "item"):
        if event.get(name) is not None:
            _object(event[name], name)
    response = event.get("response")
    items = response.get("input") if isinstance(response, dict) else None
    if items is not None:
        for i, item in enumerate(_list(items, "response.input")):
            _item(item, f"response.input[{i}]")
    if event.get("item") is not None:
        _item(event["item"], "item")
    return event


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
