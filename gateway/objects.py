"""Ownership of stored objects: which ids a request names, and who may use them.

Every object the gateway hands out (responses and compaction results, files,
conversations, vector stores, containers) is bound to (tenant, resource) when its id
first passes through. A request that names ids, in its path or anywhere in its body,
may use only its own tenant's: any other id is a 404 naming the param, exactly as if
it did not exist, and nothing goes upstream. The named objects also decide where the
request goes: they must all live on one resource.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from .errors import BadRequest, NotFound
from .state import Binding, StateBackend
from .validate import invalid_type

_ID = re.compile(r"^[A-Za-z0-9_\-]{1,256}$")

NOUN = {
    "response": "response",
    "file": "file",
    "conversation": "conversation",
    "vector_store": "vector store",
    "container": "container",
}

# Path parameters that name a stored object (the others, like item ids, live inside one).
PATH_KINDS = {
    "response_id": "response",
    "conversation_id": "conversation",
    "vector_store_id": "vector_store",
    "container_id": "container",
}


class Ref(NamedTuple):
    """One stored object a request names."""

    kind: str
    id: str
    param: str


def not_found(kind: str, object_id: str, param: str) -> NotFound:
    """The 404 for an id the tenant does not own (the same as for one that never existed)."""
    shown = object_id if _ID.match(object_id) else object_id[:64].encode("unicode_escape").decode()
    return NotFound(f"No {NOUN.get(kind, kind)} found with id '{shown}'.", param=param)


def object_id(value: Any, kind: str, param: str) -> str:
    """``value`` as an object id of ``kind`` (named by ``param``): 400 if not a string,
    404 if it cannot be an id (so it never reaches an upstream path)."""
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if not _ID.match(value):
        raise not_found(kind, value, param)
    return value


def _ids(value: Any, kind: str, param: str) -> Iterator[Ref]:
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    for i, item in enumerate(value):
        yield Ref(kind, object_id(item, kind, f"{param}[{i}]"), f"{param}[{i}]")


def body_refs(body: dict[str, Any]) -> list[Ref]:
    """Every stored-object id a JSON request body names, with the param naming it.

    Top level: ``previous_response_id``, ``conversation`` (an id or ``{"id": ...}``);
    anywhere: ``file_id``, ``file_ids``, ``vector_store_ids``, ``container_id`` (an
    ``input_file``/``input_image`` part, a chat ``file`` part, a code interpreter's
    ``container.file_ids``, ``file_search``'s ``vector_store_ids``, vector-store file
    bodies, replayed items); and a code interpreter tool's ``container`` id.
    A container file citation's ``file_id`` lives in its container: the container is
    what is checked.
    """
    refs: list[Ref] = []
    prev = body.get("previous_response_id")
    if prev is not None:
        refs.append(
            Ref(
                "response",
                object_id(prev, "response", "previous_response_id"),
                "previous_response_id",
            )
        )
    conv = body.get("conversation")
    if isinstance(conv, dict):
        if conv.get("id") is not None:
            refs.append(
                Ref(
                    "conversation",
                    object_id(conv["id"], "conversation", "conversation.id"),
                    "conversation.id",
                )
            )
    elif conv is not None:
        refs.append(
            Ref("conversation", object_id(conv, "conversation", "conversation"), "conversation")
        )
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            if isinstance(tool, dict) and isinstance(tool.get("container"), str):
                param = f"tools[{i}].container"
                refs.append(
                    Ref("container", object_id(tool["container"], "container", param), param)
                )
    for key, value in body.items():
        if key not in ("previous_response_id", "conversation") and key not in _FREE_FORM:
            _walk(value, key, refs)
    _fields(body, "", refs)
    return refs


def _fields(node: dict[str, Any], path: str, refs: list[Ref]) -> None:
    """The id-bearing fields of one object."""
    if "file_id" in node and node["file_id"] is not None:
        param = f"{path}file_id"
        if node.get("type") == "container_file_citation":
            cid = node.get("container_id")
            refs.append(
                Ref(
                    "container",
                    object_id(cid, "container", f"{path}container_id"),
                    f"{path}container_id",
                )
            )
        else:
            refs.append(Ref("file", object_id(node["file_id"], "file", param), param))
    elif node.get("container_id") is not None:
        param = f"{path}container_id"
        refs.append(Ref("container", object_id(node["container_id"], "container", param), param))
    if node.get("file_ids") is not None:
        refs.extend(_ids(node["file_ids"], "file", f"{path}file_ids"))
    if node.get("vector_store_ids") is not None:
        refs.extend(_ids(node["vector_store_ids"], "vector_store", f"{path}vector_store_ids"))


# Free-form parts of a body (JSON schemas, metadata, filters) may use these names for
# their own purposes; they never name stored objects.
_FREE_FORM = frozenset(
    {
        "metadata",
        "text",
        "response_format",
        "parameters",
        "schema",
        "json_schema",
        "input_schema",
        "headers",
        "attributes",
        "filters",
        "arguments",
    }
)


def _walk(value: Any, path: str, refs: list[Ref]) -> None:
    if isinstance(value, dict):
        _fields(value, path + ".", refs)
        for key, child in value.items():
            if isinstance(child, dict | list) and key not in _FREE_FORM:
                _walk(child, f"{path}.{key}", refs)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            if isinstance(child, dict | list):
                _walk(child, f"{path}[{i}]", refs)


async def owned(
    state: StateBackend, tenant: str, refs: list[Ref]
) -> tuple[str | None, list[Binding]]:
    """Check that ``tenant`` owns every ref: the one resource they all live on (None when
    there are no refs), and their bindings in the order of ``refs``.

    Raises 404 naming the first param whose object the tenant does not own, and 400
    when the objects live on different resources (one request cannot reach both).
    """
    if not refs:
        return None, []
    seen: dict[str, Binding] = {}
    for ref in refs:
        binding = seen.get(ref.id)
        if binding is None:
            found = await state.get_binding(ref.id)
            if found is None or found.tenant != tenant or found.kind not in ("", ref.kind):
                raise not_found(ref.kind, ref.id, ref.param)
            seen[ref.id] = binding = found
    resources = {b.resource for b in seen.values()}
    if len(resources) > 1:
        raise BadRequest(
            "The objects this request names live on different Azure resources ("
            + ", ".join(sorted(resources))
            + "); one request can only use objects from one resource.",
            code="objects_on_different_resources",
        )
    return resources.pop(), list(seen.values())


def created_ids(kind: str | None, body: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, id) of every object a JSON answer creates: its own id, and for responses
    the containers its code interpreter calls ran in."""
    out: list[tuple[str, str]] = []
    if kind is not None and isinstance(body.get("id"), str) and _ID.match(body["id"]):
        out.append((kind, body["id"]))
    output = body.get("output")
    if kind == "response" and isinstance(output, list):
        out += output_containers(output)
    return out


def output_containers(output: list[Any]) -> list[tuple[str, str]]:
    """Containers named by ``code_interpreter_call`` items of a response's output."""
    found = []
    for item in output:
        if isinstance(item, dict) and item.get("type") == "code_interpreter_call":
            cid = item.get("container_id")
            if isinstance(cid, str) and _ID.match(cid):
                found.append(("container", cid))
    return found


async def owned_ids(state: StateBackend, tenant: str, ids: list[str], kind: str) -> set[str]:
    """Which of ``ids`` the tenant owns as ``kind`` (looked up 100 at a time, concurrently)."""
    mine: set[str] = set()
    for start in range(0, len(ids), 100):
        batch = [i for i in ids[start : start + 100] if _ID.match(i)]
        found = await asyncio.gather(*(state.get_binding(i) for i in batch))
        mine.update(
            i
            for i, b in zip(batch, found, strict=True)
            if b and b.tenant == tenant and b.kind in ("", kind)
        )
    return mine
