"""Property-based fuzzing of the create and by-id routes (hypothesis).

Random JSON of every type in every field the gateway reads, random nesting, random
unicode including lone surrogates, random header values. The invariant: never a
5xx from the gateway, every error OpenAI-shaped with ``x-request-id``; afterwards a
tenant with ``max_concurrent_requests: 1`` is still served, the in-flight gauge is 0,
and no key or token appears in any log line or body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from harness import Server, Sim, Tenants, base_config, gateway
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_hardening import assert_still_served

from gateway.logs import JsonFormatter

FIELDS = (
    "model",
    "stream",
    "background",
    "store",
    "tools",
    "input",
    "previous_response_id",
    "conversation",
    "include",
)
TOOL_FIELDS = ("type", "model", "server_url", "server_label", "headers")
TOOL_FIELDS += ("require_approval", "allowed_tools", "connector_id")
ITEM_FIELDS = ("type", "id", "tools", "approve", "reason", "approval_request_id", "content")

CATEGORIES = ["Cs", "Cc", "L", "M", "N", "P", "S", "Z"]  # Cs: lone surrogates
text = st.text(
    st.characters(categories=CATEGORIES) | st.sampled_from(["\ud800", "\udfff", "\udc80"]),
    max_size=12,
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)
tool_types = st.sampled_from(["mcp", "function", "web_search", "image_generation", "file_search"])
item_types = st.sampled_from(["message", "mcp_approval_response", "mcp_list_tools", "mcp_call"])


def _obj(fields: tuple[str, ...], kind: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    values = st.fixed_dictionaries({}, optional={f: json_values for f in fields})
    typed = st.builds(lambda d, t: {**d, "type": t}, values, kind)
    return typed | values | json_values


bodies = st.fixed_dictionaries(
    {},
    optional={
        **{f: json_values for f in FIELDS},
        "model": st.sampled_from(["gpt-4.1", "o3", "nope"]) | json_values,
        "tools": st.lists(_obj(TOOL_FIELDS, tool_types), max_size=3) | json_values,
        "input": st.lists(_obj(ITEM_FIELDS, item_types), max_size=3) | text | json_values,
    },
)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20
).map(lambda s: s.strip(" \t").encode("latin-1"))
headers = st.dictionaries(
    st.sampled_from(["x-fuzz", "openai-beta", "user-agent", "x-request-id", "x-forwarded-for"])
    | st.just("x-ms-oai-image-generation-deployment"),
    header_values,
    max_size=3,
)


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.fmt = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.fmt.format(record))


@pytest.fixture
def fuzzed(identity: Sim, tenants: Tenants) -> Iterator[tuple[Server, LogLines]]:
    cfg = base_config({"swc": identity}, tenants)
    cfg["tenants"]["team-a"]["quotas"] = {"max_concurrent_requests": 1}
    cfg["audit"] = {"sinks": [{"type": "stdout"}]}
    # An owned id on a path the simulator lacks is a "not found" worth retrying.
    cfg["upstream"]["stale_read_backoff_seconds"] = 0
    lines = LogLines()
    root = logging.getLogger()
    root.addHandler(lines)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        with gateway(cfg) as server:
            yield server, lines
    finally:
        root.removeHandler(lines)
        root.setLevel(old)


def _check(r: httpx.Response, bodies_seen: list[bytes], statuses: list[int]) -> None:
    bodies_seen.append(r.content)
    statuses.append(r.status_code)
    assert r.status_code < 500, r.text
    assert r.headers.get("x-request-id")
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["message"], str) and err["message"]


def _encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # escapes lone surrogates as \\udXXX


def _secrets_absent(sim: Sim, key: str, lines: LogLines, seen: list[bytes]) -> None:
    secrets = [key, *sim.state.tokens_issued]
    for blob in [*lines.lines, *(b.decode("utf-8", "replace") for b in seen)]:
        for secret in secrets:
            assert secret not in blob


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_fuzz_create(
    fuzzed: tuple[Server, LogLines], tenants: Tenants, identity: Sim, capsys: Any
) -> None:
    gw, lines = fuzzed
    key = tenants.key("team-a")
    seen: list[bytes] = []
    statuses: list[int] = []
    with httpx.Client(base_url=gw.url, timeout=10) as client:

        @FUZZ
        @given(body=bodies, hdrs=headers, path=st.sampled_from(["", "/compact", "/input_tokens"]))
        @example(body={"model": "gpt-4.1", "input": "x"}, hdrs={}, path="")  # one that passes
        def run(body: dict[str, Any], hdrs: dict[str, bytes], path: str) -> None:
            r = client.post(
                "/openai/v1/responses" + path,
                content=_encode(body),
                headers={**hdrs, "api-key": key, "content-type": "application/json"},
            )
            _check(r, seen, statuses)

        run()
    assert any(s < 300 for s in statuses) and any(s == 400 for s in statuses), statuses
    assert_still_served(gw, key)
    seen.append(capsys.readouterr().out.encode())  # the stdout audit sink
    _secrets_absent(identity, key, lines, seen)


def test_fuzz_by_id(fuzzed: tuple[Server, LogLines], tenants: Tenants, identity: Sim) -> None:
    gw, lines = fuzzed
    key = tenants.key("team-a")
    seen: list[bytes] = []
    statuses: list[int] = []
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        r = client.post(
            "/openai/v1/responses",
            json={"model": "gpt-4.1", "input": "x", "background": True},
            headers={"api-key": key},
        )
        owned = r.json()["id"]

        @FUZZ
        @given(
            rid=st.just(owned) | text,
            op=st.sampled_from(["", "/cancel", "/input_items"]),
            method=st.sampled_from(["GET", "POST", "DELETE"]),
            body=st.none() | json_values.map(_encode) | st.binary(max_size=64),
            hdrs=headers,
            query=st.sampled_from(["", "?stream=true", "?stream=true&starting_after=2", "?x=%ff"]),
        )
        def run(
            rid: str, op: str, method: str, body: bytes | None, hdrs: dict[str, bytes], query: str
        ) -> None:
            if method == "DELETE" and rid == owned:
                method = "GET"  # keep the owned response for later examples
            path = "/openai/v1/responses/" + quote(rid.encode("utf-8", "surrogatepass"), safe="")
            r = client.request(
                method, path + op + query, content=body, headers={**hdrs, "api-key": key}
            )
            _check(r, seen, statuses)

        run()
    assert any(s < 300 for s in statuses) and any(s == 400 for s in statuses), statuses
    assert_still_served(gw, key)
    _secrets_absent(identity, key, lines, seen)


ID_FIELDS = ("file_id", "file_ids", "vector_store_ids", "container_id", "conversation")
id_values = st.sampled_from(["file-x", "vs_x", "cntr_x", "conv_x", "../x", ""]) | json_values
surface_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["gpt-4.1", "o3", "nope"]) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({}, optional={"role": text, "content": json_values}), max_size=2
        )
        | json_values,
        "input": json_values,
        "items": st.lists(st.dictionaries(st.sampled_from(ID_FIELDS), id_values), max_size=2),
        "stream": json_values,
        "tools": st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["code_interpreter", "file_search", "function"])},
                optional={"container": id_values, "vector_store_ids": id_values},
            ),
            max_size=2,
        )
        | json_values,
        **{f: id_values for f in ID_FIELDS},
    },
)
SURFACE = [
    "/openai/v1/chat/completions",
    "/openai/deployments/gpt-4.1/chat/completions?api-version=2025-04-01-preview",
    "/openai/deployments/o3/embeddings?api-version=2025-04-01-preview",
    "/openai/v1/embeddings",
    "/openai/v1/completions",
    "/openai/v1/conversations",
    "/openai/v1/vector_stores",
    "/openai/v1/containers",
    "/openai/v1/conversations/conv_x/items",
    "/openai/v1/vector_stores/vs_x/files",
    "/openai/v1/files",
    "/openai/v1/audio/speech",
]


def test_fuzz_surface(fuzzed: tuple[Server, LogLines], tenants: Tenants, identity: Sim) -> None:
    """Every other endpoint's JSON body, with ids of every type everywhere they can be."""
    gw, lines = fuzzed
    key = tenants.key("team-a")
    seen: list[bytes] = []
    statuses: list[int] = []
    with httpx.Client(base_url=gw.url, timeout=10) as client:

        @FUZZ
        @given(body=surface_bodies, path=st.sampled_from(SURFACE), hdrs=headers)
        def run(body: dict[str, Any], path: str, hdrs: dict[str, bytes]) -> None:
            r = client.post(
                path,
                content=_encode(body),
                headers={**hdrs, "api-key": key, "content-type": "application/json"},
            )
            _check(r, seen, statuses)

        run()
    assert any(s == 404 for s in statuses) and any(s == 400 for s in statuses), statuses
    r = httpx.post(
        gw.url + "/openai/v1/chat/completions",
        headers={"api-key": key},
        json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "still there?"}]},
    )
    assert r.status_code == 200, r.text
    assert_still_served(gw, key)
    _secrets_absent(identity, key, lines, seen)


def test_fuzz_forms(fuzzed: tuple[Server, LogLines], tenants: Tenants, identity: Sim) -> None:
    """Multipart bodies: random bytes, random boundaries, random model fields."""
    gw, lines = fuzzed
    key = tenants.key("team-a")
    seen: list[bytes] = []
    statuses: list[int] = []
    part = st.tuples(
        st.sampled_from([b"model", b"file", b"purpose", b"x"]),
        st.binary(max_size=40),
        st.booleans(),
    )

    def encode(sep: bytes, parts: list[tuple[bytes, bytes, bool]], tail: bytes) -> bytes:
        out = b""
        for name, value, is_file in parts:
            disp = b'form-data; name="' + name + b'"' + (b'; filename="f"' if is_file else b"")
            out += b"--" + sep + b"\r\nContent-Disposition: " + disp + b"\r\n\r\n" + value + b"\r\n"
        return out + b"--" + sep + b"--\r\n" + tail

    with httpx.Client(base_url=gw.url, timeout=10) as client:

        @FUZZ
        @given(
            sep=st.sampled_from([b"b", b"--x", b"a b", b""]),
            parts=st.lists(part, max_size=4),
            tail=st.binary(max_size=8),
            raw=st.none() | st.binary(max_size=80),
            path=st.sampled_from(
                ["/openai/v1/audio/transcriptions", "/openai/v1/files", "/openai/v1/images/edits"]
            ),
        )
        def run(
            sep: bytes,
            parts: list[tuple[bytes, bytes, bool]],
            tail: bytes,
            raw: bytes | None,
            path: str,
        ) -> None:
            body = raw if raw is not None else encode(sep, parts, tail)
            ctype = b"multipart/form-data; boundary=" + sep
            r = client.post(path, content=body, headers={"api-key": key, "content-type": ctype})
            _check(r, seen, statuses)

        run()
    assert any(s == 400 for s in statuses), statuses
    # A well-formed form is still served afterwards.
    r = httpx.post(
        gw.url + "/openai/v1/audio/transcriptions",
        headers={"api-key": key},
        data={"model": "gpt-4o-mini"},
        files={"file": ("a.wav", b"RIFF")},
    )
    assert r.status_code == 200, r.text
    assert_still_served(gw, key)
    _secrets_absent(identity, key, lines, seen)


OBJECT_PATHS = [
    "/openai/v1/files/{}",
    "/openai/v1/files/{}/content",
    "/openai/v1/conversations/{}",
    "/openai/v1/conversations/{}/items/x",
    "/openai/v1/vector_stores/{}/files/file-x",
    "/openai/v1/containers/{}/files/cfile_x/content",
    "/openai/files/{}?api-version=2025-04-01-preview",
]


def test_fuzz_object_ids(fuzzed: tuple[Server, LogLines], tenants: Tenants, identity: Sim) -> None:
    """Random ids (any unicode, slashes, dots, encodings) in every kind of object path."""
    gw, lines = fuzzed
    key = tenants.key("team-a")
    seen: list[bytes] = []
    statuses: list[int] = []
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        conv = client.post("/openai/v1/conversations", json={}, headers={"api-key": key}).json()[
            "id"
        ]

        @FUZZ
        @given(
            oid=st.just(conv) | text | st.sampled_from(["..", ".", "%2F", "a/b", "file-1"]),
            path=st.sampled_from(OBJECT_PATHS),
            method=st.sampled_from(["GET", "POST", "DELETE"]),
            body=st.none() | json_values.map(_encode),
        )
        def run(oid: str, path: str, method: str, body: bytes | None) -> None:
            if method == "DELETE" and oid == conv:
                method = "GET"
            quoted = quote(oid.encode("utf-8", "surrogatepass"), safe="")
            r = client.request(method, path.format(quoted), content=body, headers={"api-key": key})
            _check(r, seen, statuses)

        run()
    assert any(s < 300 for s in statuses) and any(s == 404 for s in statuses), statuses
    assert_still_served(gw, key)
    _secrets_absent(identity, key, lines, seen)
