"""Unit properties of the route table, the multipart rewrite and the body-id walk."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.body import read_form
from gateway.errors import GatewayError
from gateway.objects import body_refs
from gateway.routes import DEPLOYMENTS, ENDPOINTS, PREVIEW, V1, Match, RouteTable, segments

TABLE = RouteTable()


def match(method: str, path: str) -> Match | None:
    return TABLE.match(method, segments(path.encode()))


def test_every_row_is_reachable_on_each_prefix() -> None:
    for ep in ENDPOINTS:
        for prefix in ep.prefixes:
            if prefix == DEPLOYMENTS and ep.route not in ("model", "form"):
                continue
            path = (prefix + ep.path).replace("{deployment}", "gpt-4.1")
            for name in ("response_id", "file_id", "conversation_id", "vector_store_id"):
                path = path.replace("{" + name + "}", "x_1")
            for name in ("container_id", "item_id", "batch_id"):
                path = path.replace("{" + name + "}", "y_2")
            m = match(ep.method, path)
            assert m is not None and m.endpoint == ep, (ep.method, path)
    assert len({(ep.method, ep.path) for ep in ENDPOINTS}) == len(ENDPOINTS)  # no duplicate rows


def test_fixed_paths_win_over_ids() -> None:
    for prefix in (V1, PREVIEW):
        assert match("POST", prefix + "/responses/compact").endpoint.operation == "compact"  # type: ignore[union-attr]
        assert match("GET", prefix + "/responses/compact").endpoint.operation == "retrieve"  # type: ignore[union-attr]
    assert match("GET", "/openai/v1/responses/a/b") is None
    assert match("PUT", "/openai/v1/files") is None
    assert TABLE.known_path(segments(b"/openai/v1/files"))
    # A parameter is one whole segment, decoded once: an encoded slash never splits it,
    # and the upstream path is the template filled with it.
    m = match("GET", "/openai/v1/conversations/conv_1/items/..%252F..%252Fconv_2")
    assert m is not None and m.params["item_id"] == "..%2F..%2Fconv_2"
    m = match("GET", "/openai/v1/files%2Fx")
    assert m is None
    m = match("DELETE", "/openai/v1/respons%65s/resp_1")
    assert m is not None and m.upstream_path() == "/openai/v1/responses/resp_1"


segment = st.text(st.sampled_from("abc_-/.%{}"), min_size=0, max_size=12)


@given(st.lists(segment, max_size=5), st.sampled_from(["GET", "POST", "DELETE", "PUT"]))
def test_match_never_crashes_and_ids_hold_no_slash(segs: list[str], method: str) -> None:
    m = match(method, "/openai/v1/" + "/".join(segs))
    if m is not None:
        assert all(v for v in m.params.values())
        assert m.upstream_path().count("/") == (m.prefix + m.endpoint.path).count("/")


field_value = st.text(st.characters(blacklist_categories=["Cs"]), max_size=20)


@given(
    model=field_value,
    new=field_value,
    files=st.lists(st.binary(max_size=64), max_size=3),
    before=st.booleans(),
)
def test_form_rewrite_changes_only_the_model(
    model: str, new: str, files: list[bytes], before: bool
) -> None:
    """The form sent upstream is rebuilt from the parsed parts: the model replaced, file
    bytes exactly as sent, whatever the order."""
    import asyncio

    sep = b"sep-123"
    files = [data.replace(b"\r\n--", b"") for data in files]
    file_parts = [
        b"--" + sep + b'\r\nContent-Disposition: form-data; name="file"; filename="model"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
        for data in files
    ]
    model_part = (
        b"--"
        + sep
        + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        + model.encode()
        + b"\r\n"
    )
    body = b"".join([model_part, *file_parts] if before else [*file_parts, model_part])
    body += b"--" + sep + b"--\r\n"
    if "\r\n--" in model or "\r\n--" in new:
        return  # a value cannot hold its own delimiter in a valid form

    async def parse(data: bytes, boundary: bytes) -> Any:
        async def chunks() -> Any:
            yield data

        return await read_form(chunks(), boundary, frozenset({"model"}), 1 << 20)

    async def run() -> None:
        form = await parse(body, sep)
        assert form.field("model") == model
        ctype, length, upstream = form.encode({"model": new})
        out = b"".join([c async for c in upstream])
        assert len(out) == length
        again = await parse(out, ctype.split("boundary=")[1].encode())
        assert again.field("model") == new
        spooled = []
        for part in again.parts:
            if part.spool is not None:
                part.spool.seek(0)
                spooled.append(part.spool.read())
        assert spooled == files
        form.close()
        again.close()

    asyncio.run(run())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "file_id",
                    "file_ids",
                    "vector_store_ids",
                    "container_id",
                    "type",
                    "x",
                    "content",
                    "tools",
                    "container",
                    "metadata",
                    "conversation",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=15,
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "input",
                "tools",
                "previous_response_id",
                "conversation",
                "file_id",
                "metadata",
                "messages",
            ]
        ),
        json_values,
    )
)
def test_body_refs_only_raise_gateway_errors(body: dict[str, Any]) -> None:
    try:
        refs = body_refs(body)
    except GatewayError as exc:
        assert exc.status in (400, 404) and exc.param
        return
    for ref in refs:
        assert ref.kind in ("response", "file", "conversation", "vector_store", "container")
        assert ref.param and ref.id


def test_body_refs_skip_free_form_parts() -> None:
    body = {
        "model": "m",
        "metadata": {"file_id": 5},
        "text": {"format": {"schema": {"properties": {"file_id": {"type": "string"}}}}},
        "tools": [{"type": "function", "parameters": {"properties": {"file_ids": {}}}}],
        "input": [{"type": "message", "content": [{"type": "input_file", "file_id": "file-1"}]}],
    }
    assert [(r.id, r.param) for r in body_refs(body)] == [("file-1", "input[0].content[0].file_id")]
    with pytest.raises(GatewayError) as info:
        body_refs({"input": [{"content": [{"type": "input_file", "file_id": 7}]}]})
    assert info.value.status == 400 and info.value.param == "input[0].content[0].file_id"


def test_container_settings_are_walked_whole() -> None:
    tool = {"type": "code_interpreter", "container": {"type": "auto", "id": "cntr_" + "a" * 24}}
    refs = body_refs({"tools": [tool]})
    assert [(r.kind, r.param) for r in refs] == [("container", "tools[0].container.id")]


def test_the_endpoint_table_in_the_docs_is_the_route_table() -> None:
    import pathlib

    from gateway.routes import markdown

    page = (pathlib.Path(__file__).parent.parent / "docs" / "api.md").read_text()
    table = page.split("<!-- routes:begin -->\n", 1)[1].split("<!-- routes:end -->", 1)[0]
    assert table == markdown(), (
        "docs/api.md's endpoint table is stale: paste gateway.routes.markdown()"
    )
