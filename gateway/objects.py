"""Ownership of stored objects: which ids a request names (read side), and what an
answer creates, deletes and lists (write side, ``Keeper``).

Every object the gateway hands out (responses and compaction results, files,
conversations, vector stores, containers) is bound to (tenant, resource) when its id
first passes through. Ownership is checked by *shape*, not by place: every string of a
request (JSON at any depth, form fields, path and query parameters) that looks like a
stored-object id (``SHAPES``) must be the tenant's own, whatever key or ``type`` it sits
under; keys that name ids (``ID_KEYS``) are checked whatever their value looks like.
Free text the model reads (``FREE_TEXT``) and free-form subtrees (``FREE_FORM``) are
forwarded but never read as ids. Any other id is a 404 naming the param, exactly as if
it did not exist, and nothing goes upstream. The named objects also decide where the
request goes: they must all live on one resource.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import BadRequest, NotFound
from .state import Binding, StateBackend
from .validate import dump_json, invalid_type

if TYPE_CHECKING:
    from .exchange import Exchange
    from .runtime import Gateway

log = logging.getLogger("gateway.objects")

_ID = re.compile(r"[A-Za-z0-9_\-]{1,256}")

# The ids Azure makes: prefix, kind, and the body after the prefix. A container file
# (``cfile_``) lives in its container, which is what is checked.
SHAPES: tuple[tuple[str, str, str], ...] = (
    ("resp_", "response", "[A-Za-z0-9]{16,200}"),
    ("conv_", "conversation", "[A-Za-z0-9]{16,200}"),
    ("file-", "file", "[A-Za-z0-9]{16,200}"),
    ("assistant-", "file", "[A-Za-z0-9]{16,200}"),
    ("vs_", "vector_store", "[A-Za-z0-9]{16,200}"),
    ("cntr_", "container", "[A-Za-z0-9]{16,200}"),
    ("cfile_", "container_file", "[A-Za-z0-9]{16,200}"),
    ("batch_", "batch", "[A-Za-z0-9][A-Za-z0-9-]{15,200}"),
)
_SHAPE = re.compile(
    "|".join(f"(?P<k{i}>{re.escape(prefix)}{body})" for i, (prefix, _, body) in enumerate(SHAPES))
)
_SHAPE_KIND = {f"k{i}": kind for i, (_, kind, _) in enumerate(SHAPES)}
_WORD = re.compile(r"[A-Za-z0-9_-]{19,}")

NOUN = {
    "response": "response",
    "file": "file",
    "conversation": "conversation",
    "vector_store": "vector store",
    "container": "container",
    "container_file": "container file",
    "batch": "batch",
}

# Keys whose value is an id (or a list of ids) of this kind, whatever it looks like.
ID_KEYS = {
    "previous_response_id": "response",
    "response_id": "response",
    "conversation": "conversation",
    "conversation_id": "conversation",
    "file_id": "file",
    "file_ids": "file",
    "input_file_id": "file",
    "output_file_id": "file",
    "error_file_id": "file",
    "vector_store_id": "vector_store",
    "vector_store_ids": "vector_store",
    "container_id": "container",
    "container": "container",
}
# Keys the gateway reads: a key equal to one of these but for case is refused, since an
# upstream binder that matches names case-insensitively would read it unchecked.
READ_KEYS = frozenset(
    {
        *ID_KEYS,
        "model",
        "stream",
        "background",
        "store",
        "tools",
        "type",
        "input",
        "server_url",
        "server_label",
        "connector_id",
        "tunnel_id",
        "require_approval",
        "allowed_tools",
        "include",
        "purpose",
        "id",
    }
)
# Free-form subtrees (schemas, metadata, filters, MCP headers): forwarded, never ids.
FREE_FORM = frozenset(
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
    }
)
# Free text the model reads or writes: a string (or list of strings) under these keys is
# never an id; objects and arrays under them are still walked.
FREE_TEXT = frozenset(
    {
        "instructions",
        "input",
        "content",
        "arguments",
        "output",
        "prompt",
        "query",
        "description",
        "reason",
        "refusal",
        "transcript",
        "summary",
        "encrypted_content",
        "code",
        "logs",
        "result",
        "error",
        "name",
        "delta",
        "audio",
    }
)

# Path parameters that name a stored object (the others live inside one).
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


def shape_kind(value: str) -> str | None:
    """The kind of stored object ``value`` has the shape of, or None."""
    m = _SHAPE.fullmatch(value)
    return _SHAPE_KIND[m.lastgroup] if m is not None and m.lastgroup else None


def not_found(kind: str, object_id: str, param: str) -> NotFound:
    """The 404 for an id the tenant does not own (the same as for one that never existed)."""
    shown = (
        object_id if _ID.fullmatch(object_id) else object_id[:64].encode("unicode_escape").decode()
    )
    return NotFound(f"No {NOUN.get(kind, kind)} found with id '{shown}'.", param=param)


def object_id(value: Any, kind: str, param: str) -> str:
    """``value`` as an object id of ``kind`` (named by ``param``): 400 if not a string,
    404 if it cannot be an id (so it never reaches an upstream path)."""
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if not _ID.fullmatch(value):
        raise not_found(kind, value, param)
    return value


MCP_ITEMS = frozenset(
    {"mcp_approval_response", "mcp_list_tools", "mcp_call", "mcp_approval_request"}
)
# Keys whose subtree names tools without defining them: never a tool list to police.
_TOOL_REFERENCES = frozenset({"tool_choice"})


class Refs:
    """What one request names, collected from every part of it in one walk: the stored
    objects (``refs``), and for the rules, every model (``models``), every list of tool
    definitions (``tools``) and every MCP item (``mcp_items``), each with its param path."""

    __slots__ = ("mcp_items", "models", "parent_container", "refs", "tools", "words")

    def __init__(
        self, parent_container: str | None = None, words: frozenset[str] = frozenset()
    ) -> None:
        self.refs: list[Ref] = []
        # (param, model, the object naming it, its key): rewritten per target in place.
        self.models: list[tuple[str, Any, dict[str, Any], str]] = []
        self.tools: list[tuple[str, list[Any]]] = []
        self.mcp_items: list[tuple[str, dict[str, Any]]] = []
        # A container named by the path: container files under it are its own.
        self.parent_container = parent_container
        # Values that are words of the envelope's protocol under an id key, never ids
        # (Realtime's ``conversation: "auto" | "none"``).
        self.words = words

    def named(self, value: Any, kind: str, param: str, container: Any = None) -> None:
        """An id under a key that names ids: it must be the tenant's ``kind``."""
        oid = object_id(value, kind, param)
        if kind == "file" and shape_kind(oid) == "container_file":
            kind = "container_file"  # a container's own file, named by its container
        self._add(oid, kind, param, container)

    def text(self, value: str, param: str, container: Any = None) -> None:
        """Any other string: an id only if it has the shape of one."""
        kind = shape_kind(value)
        if kind is not None:
            self._add(value, kind, param, container)

    def tokens(self, value: str, param: str) -> None:
        """A text field (a form field, a query value): every id-shaped word in it, since
        an upstream may read such a field as more than one value (JSON, a list)."""
        if shape_kind(value) is not None:
            self.text(value, param)
            return
        for word in _WORD.findall(value):
            self.text(word, param)

    def _add(self, oid: str, kind: str, param: str, container: Any) -> None:
        if kind == "container_file":
            # Checked through its container: one named beside it, or the path's.
            if not isinstance(container, str) and self.parent_container is None:
                raise not_found(kind, oid, param)
            return
        self.refs.append(Ref(kind, oid, param))

    def body(self, body: Any) -> list[Ref]:
        """Walk a parsed JSON body; returns the stored-object refs collected so far."""
        self._walk(body, "", False, False)
        return self.refs

    def _walk(self, node: Any, path: str, free: bool, referenced: bool) -> None:
        if isinstance(node, dict):
            container = node.get("container_id")
            kind = node.get("type")
            if isinstance(kind, str) and kind in MCP_ITEMS and not referenced:
                self.mcp_items.append((path, node))
            for key, child in node.items():
                param = f"{path}.{key}" if path else key
                if key in ID_KEYS:
                    self._id_key(key, child, param, container)
                    continue
                if key not in READ_KEYS and key.lower() in READ_KEYS:
                    raise BadRequest(
                        f"Key '{param}' differs from '{key.lower()}' only in case; use "
                        f"'{key.lower()}' (keys are case-sensitive).",
                        code="invalid_key_case",
                        param=param,
                    )
                if key in FREE_FORM:
                    continue
                if key == "model" and child is not None:
                    if not isinstance(child, str):
                        raise invalid_type(param, "a string", child)
                    self.models.append((param, child, node, key))
                    continue
                # (an mcp_list_tools item's ``tools`` lists a server's tools: not tools)
                if (
                    key == "tools"
                    and child is not None
                    and not referenced
                    and kind != "mcp_list_tools"
                ):
                    if not isinstance(child, list):
                        raise invalid_type(param, "an array", child)
                    self.tools.append((param, child))
                if isinstance(child, str):
                    if key not in FREE_TEXT:
                        self.text(child, param, container)
                elif isinstance(child, list | dict):
                    inner = referenced or key in _TOOL_REFERENCES
                    self._walk(child, param, key in FREE_TEXT, inner)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                if isinstance(child, str):
                    if not free:
                        self.text(child, f"{path}[{i}]")
                elif isinstance(child, dict | list):
                    self._walk(child, f"{path}[{i}]", False, referenced)

    def _id_key(self, key: str, value: Any, param: str, container: Any) -> None:
        kind = ID_KEYS[key]
        if value is None or (isinstance(value, str) and value in self.words):
            return
        if isinstance(value, str):
            self.named(value, kind, param, container)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self.named(item, kind, f"{param}[{i}]", container)
        elif isinstance(value, dict) and key == "conversation":
            if value.get("id") is not None:
                self.named(value["id"], kind, f"{param}.id")
            self._walk({k: v for k, v in value.items() if k != "id"}, param, False, False)
        elif isinstance(value, dict) and key == "container":
            self._walk(value, param, False, False)  # a code interpreter's container settings
        else:
            raise invalid_type(param, "a string", value)


def body_refs(body: dict[str, Any]) -> list[Ref]:
    """Every stored-object id a JSON request body names, with the param naming it."""
    return Refs().body(body)


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
        elif binding.kind not in ("", ref.kind):
            raise not_found(ref.kind, ref.id, ref.param)
    resources = {b.resource for b in seen.values()}
    if len(resources) > 1:
        raise BadRequest(
            "The objects this request names live on different Azure resources; one request "
            "can only use objects made on one resource.",
            code="objects_on_different_resources",
        )
    return resources.pop(), list(seen.values())


def created_ids(kind: str | None, body: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, id) of every object a JSON answer creates: its own id, and for responses
    the containers its code interpreter calls ran in."""
    out: list[tuple[str, str]] = []
    if kind is not None and isinstance(body.get("id"), str) and _ID.fullmatch(body["id"]):
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
            if isinstance(cid, str) and _ID.fullmatch(cid):
                found.append(("container", cid))
    return found


async def owned_ids(state: StateBackend, tenant: str, ids: list[str], kind: str) -> set[str]:
    """Which of ``ids`` the tenant owns as ``kind`` (looked up 100 at a time, concurrently)."""
    mine: set[str] = set()
    for start in range(0, len(ids), 100):
        batch = [i for i in ids[start : start + 100] if _ID.fullmatch(i)]
        found = await asyncio.gather(*(state.get_binding(i) for i in batch))
        mine.update(
            i
            for i, b in zip(batch, found, strict=True)
            if b and b.tenant == tenant and b.kind in ("", kind)
        )
    return mine


# How many upstream list pages a filtered list may read to fill one page of the tenant's.
MAX_LIST_PAGES = 20


class Keeper:
    """What an answer changes in the bindings: the ids it creates, the id it deletes,
    and which items of a list the tenant may see."""

    def __init__(
        self,
        gw: Gateway,
        ex: Exchange,
        creates: str | None,
        lists: str | None,
        ttl: float,
        deleted: str | None = None,
        limit: int | None = None,
    ) -> None:
        self.gw = gw
        self.ex = ex
        self.creates = creates
        self.lists = lists
        self.deleted = deleted
        self.ttl = ttl
        self.limit = limit  # the page size the client asked for (None: the upstream's)
        # Reads the next upstream page of a list after a cursor (set when forwarded).
        self.next_page: Callable[[str], Awaitable[Any]] | None = None

    async def bind(self, kind: str, oid: str) -> None:
        ex = self.ex
        assert ex.principal is not None and ex.target is not None
        if kind == "response" and ex.response_id is None:
            ex.response_id = oid
        binding = Binding(ex.principal.tenant, ex.target.resource, ex.model or "", kind)
        try:
            await self.gw.state.bind_response(oid, binding, self.ttl)
        except Exception as exc:
            # The object exists upstream already; the client still gets its answer.
            log.error(
                "could not bind an object to its tenant",
                extra={"request_id": ex.request_id, "reason": type(exc).__name__, "kind": kind},
            )

    async def created(self, body: dict[str, Any]) -> None:
        """Bind what a JSON answer created."""
        for kind, oid in created_ids(self.creates, body):
            await self.bind(kind, oid)

    async def forget(self) -> None:
        """A delete succeeded: the id is gone for everyone."""
        if self.deleted is not None:
            await self.gw.state.delete_binding(self.deleted)

    async def only_mine(self, body: dict[str, Any]) -> bytes | None:
        """A list answer with only the tenant's items (None: leave it as it is).

        Upstream pages are read on until the client's page is full and one more of the
        tenant's items is seen (then ``has_more``), or the upstream has no more (up to
        ``MAX_LIST_PAGES`` pages): ``has_more`` and the cursors speak of the tenant's own
        items only, never of another tenant's.
        """
        if self.lists is None or not isinstance(body.get("data"), list):
            return None
        assert self.ex.principal is not None
        tenant = self.ex.principal.tenant
        limit = self.limit or max(len(body["data"]), 1)
        kept: list[dict[str, Any]] = []
        changed = False
        pages = 1
        while True:
            data = [d for d in body["data"] if isinstance(d, dict)]
            ids = [d["id"] for d in data if isinstance(d.get("id"), str)]
            mine = await owned_ids(self.gw.state, tenant, ids, self.lists)
            page_kept = [d for d in data if d.get("id") in mine]
            changed = changed or len(page_kept) != len(body["data"])
            kept += page_kept
            cursor = ids[-1] if ids else None
            more = body.get("has_more") is True
            if len(kept) > limit or not more or not isinstance(cursor, str):
                break
            if self.next_page is None or pages >= MAX_LIST_PAGES:
                log.warning(
                    "list walk stopped before the page was full",
                    extra={"request_id": self.ex.request_id, "pages": pages},
                )
                break
            page = await self.next_page(cursor)
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                more = False
                break
            body, pages, changed = page, pages + 1, True
        # At the page cap the walk cannot tell; it says "more" only with a cursor to go on.
        has_more = len(kept) > limit or (more and pages >= MAX_LIST_PAGES and bool(kept))
        if not changed and has_more == (body.get("has_more") is True) and len(kept) <= limit:
            return None
        kept = kept[:limit]
        out = dict(body, data=kept, has_more=has_more)
        # The cursors name the tenant's own items only (never another tenant's id).
        for name, index in (("first_id", 0), ("last_id", -1)):
            if name in body:
                out[name] = kept[index]["id"] if kept else None
        return dump_json(out)
