"""The isolation findings, one regression each: a team holding only its own valid key
never gets another team's object, whatever reading of the request the upstream takes.

Team a owns the objects; team b attacks with its own key. Each attack must be refused
before anything reaches the upstream (the simulator records every request).
"""

from __future__ import annotations

import http.client
import io
import json
import posixpath
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants, base_config, gateway, serving

from gateway.simulator import SimState, create_simulator


class Normalising:
    """An upstream hop that decodes %2F and resolves dot segments, as many HTTP stacks do,
    in front of the simulator: a traversal that reaches the upstream path bites here."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope["path"].encode()
            path = posixpath.normpath(unquote(unquote(raw.decode("latin-1"))))
            scope = dict(scope, path=path, raw_path=path.encode())
        await self.app(scope, receive, send)


@pytest.fixture
def world(identity: Sim, tenants: Tenants) -> Iterator[dict[str, Any]]:
    """A gateway whose upstream normalises paths; team a's objects; both teams' clients."""
    state = SimState(region="swedencentral")
    with serving(Normalising(create_simulator(state))) as up:
        cfg = base_config({"swc": identity}, tenants)
        cfg["resources"]["swc"]["endpoint"] = up.url
        cfg["tenants"]["team-b"]["quotas"] = {"max_concurrent_requests": 1}
        with gateway(cfg) as gw:
            a = _client(gw, tenants.key("team-a"))
            b = _client(gw, tenants.key("team-b"))
            file_a = a.files.create(
                file=("a.txt", io.BytesIO(b"team-a secret")), purpose="assistants"
            )
            conv_a = a.conversations.create(items=[{"role": "user", "content": "a's"}])
            vs_b = b.vector_stores.create(name="b's")
            file_b = b.files.create(file=("b.txt", io.BytesIO(b"b")), purpose="assistants")
            cntr_b = b.containers.create(name="b's")
            yield {
                "gw": gw,
                "state": state,
                "a": a,
                "b": b,
                "key_b": tenants.key("team-b"),
                "file_a": file_a.id,
                "conv_a": conv_a.id,
                "vs_b": vs_b.id,
                "file_b": file_b.id,
                "cntr_b": cntr_b.id,
            }


def _client(gw: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0)


def _refused(w: dict[str, Any], method: str, path: str, status: int, **kw: Any) -> httpx.Response:
    """Send as team b; the answer is a shaped ``status`` and nothing reached the upstream."""
    before = len(w["state"].api_requests())
    headers = {"api-key": w["key_b"], **kw.pop("headers", {})}
    r = httpx.request(method, w["gw"].url + path, headers=headers, **kw)
    assert r.status_code == status, (path, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "swc" not in r.text and "127.0.0.1" not in r.text
    assert len(w["state"].api_requests()) == before, "something reached the upstream"
    return r


def test_1_citation_type_does_not_hide_a_file_id(world: dict[str, Any]) -> None:
    w = world
    vs, fa = w["vs_b"], w["file_a"]
    body = {"file_id": fa, "type": "container_file_citation", "container_id": w["cntr_b"]}
    _refused(w, "POST", f"/openai/v1/vector_stores/{vs}/files", 404, json=body)
    batch = {"files": [{"file_id": fa, "type": "container_file_citation"}]}
    _refused(w, "POST", f"/openai/v1/vector_stores/{vs}/file_batches", 404, json=batch)
    _refused(w, "GET", f"/openai/v1/vector_stores/{vs}/files/{fa}/content", 404)
    chat = {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": fa}}]}],
    }
    _refused(w, "POST", "/openai/v1/chat/completions", 404, json=chat)


@pytest.mark.parametrize(
    "ctype", ["Application/JSON", "text/json", "application/vnd.api+json", None]
)
def test_2_container_file_copy_under_any_content_type(
    world: dict[str, Any], ctype: str | None
) -> None:
    w = world
    body = json.dumps({"file_id": w["file_a"]}).encode()
    headers = {"content-type": ctype} if ctype else {}
    path = f"/openai/v1/containers/{w['cntr_b']}/files"
    _refused(w, "POST", path, 404, content=body, headers=headers)


def test_2_container_file_copy_as_a_form_field(world: dict[str, Any]) -> None:
    w = world
    path = f"/openai/v1/containers/{w['cntr_b']}/files"
    _refused(w, "POST", path, 404, data={"file_id": w["file_a"]}, files={"x": ("x", b"")})
    _refused(w, "POST", path, 415, content=b"file_id=x", headers={"content-type": "text/plain"})


@pytest.mark.parametrize(
    "item",
    [
        "..%252F..%252F{conv_a}",
        "..%2F..%2F{conv_a}",
        "%2E%2E",
        ".",
        "..",
        "x%3Fy",
        "x%20y",
        "x%00y",
        "x%0D%0Ay",
        "msg%2F..",
    ],
)
def test_3_path_ids_are_plain_ids(world: dict[str, Any], item: str) -> None:
    w = world
    own = w["b"].conversations.create()
    path = f"/openai/v1/conversations/{own.id}/items/" + item.format(conv_a=w["conv_a"])
    host, port = w["gw"].url.removeprefix("http://").split(":")
    for method in ("GET", "DELETE"):
        before = len(w["state"].api_requests())
        # http.client sends the path as written (httpx would resolve the dot segments).
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request(method, path, headers={"api-key": w["key_b"]})
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
        # Either no route at all (a dot segment) or the id refused: never upstream.
        assert r.status == 404, (path, body)
        assert body["error"]["type"] == "invalid_request_error"
        assert len(w["state"].api_requests()) == before
    # Team a's conversation is untouched.
    assert w["a"].conversations.retrieve(w["conv_a"]).id == w["conv_a"]
    assert w["a"].conversations.items.list(w["conv_a"]).data


def test_4_second_model_field(world: dict[str, Any]) -> None:
    w = world
    sep = "x-sep"
    form = (
        f'--{sep}\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4.1\r\n'
        f'--{sep}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
        f'--{sep}\r\nContent-Disposition: form-data; name="model"\r\n\r\ndep-o3-swc\r\n'
        f"--{sep}--\r\n"
    ).encode()
    headers = {"content-type": f"multipart/form-data; boundary={sep}"}
    r = _refused(w, "POST", "/openai/v1/audio/transcriptions", 400, content=form, headers=headers)
    assert r.json()["error"]["code"] == "duplicate_field"
    # Case variants of a read field, and a read field sent as a file, are refused too.
    for twist in ('name="Model"', 'name="model"; filename="m"'):
        odd = form.replace(b'name="model"\r\n\r\ndep-o3-swc', twist.encode() + b"\r\n\r\ndep")
        _refused(w, "POST", "/openai/v1/audio/transcriptions", 400, content=odd, headers=headers)


def test_5_container_id_beside_a_file_id(world: dict[str, Any]) -> None:
    w = world
    other = w["a"].containers.create(name="a's")
    item = {"type": "input_file", "file_id": w["file_b"], "container_id": other.id}
    body = {"model": "gpt-4.1", "input": [{"role": "user", "content": [item]}]}
    _refused(w, "POST", "/openai/v1/responses", 404, json=body)


def test_6_duplicate_keys_and_rewrites_on_every_route(world: dict[str, Any]) -> None:
    w = world
    fa, fb = w["file_a"], w["file_b"]
    dup = f'{{"file_id": "{fa}", "file_id": "{fb}"}}'.encode()
    for path in (
        f"/openai/v1/vector_stores/{w['vs_b']}/files",  # object route
        "/openai/v1/vector_stores",  # home route
        "/openai/v1/responses/input_tokens",
        "/openai/v1/responses/compact",
    ):
        r = _refused(
            w, "POST", path, 400, content=dup, headers={"content-type": "application/json"}
        )
        assert r.json()["error"]["code"] == "duplicate_key"
    # The MCP require_approval rewrite reaches the upstream on a route without model.
    b = w["b"]
    prev = b.responses.create(model="gpt-4.1", input="x")
    mcp = {"type": "mcp", "server_label": "d", "server_url": "https://mcp.example/sse"}
    cfg_policy = {"require_approval": "never", **mcp}
    r = httpx.post(
        w["gw"].url + "/openai/v1/responses/input_tokens",
        headers={"api-key": w["key_b"]},
        json={"previous_response_id": prev.id, "tools": [cfg_policy], "input": "x"},
    )
    assert r.status_code == 200, r.text
    sent = json.loads(w["state"].api_requests()[-1].body)
    assert sent["tools"] == [cfg_policy]  # no policy for team b: forwarded as parsed


@pytest.mark.parametrize(
    "key", ["File_Id", "FILE_IDS", "Previous_Response_Id", "Vector_Store_Ids", "Model"]
)
def test_7_case_variant_keys(world: dict[str, Any], key: str) -> None:
    w = world
    value: Any = w["file_a"]
    if key.lower().endswith("ids"):
        value = [value]
    item = {"type": "input_file", key: value}
    body = {"model": "gpt-4.1", "input": [{"role": "user", "content": [item]}]}
    r = _refused(w, "POST", "/openai/v1/responses", 400, json=body)
    assert r.json()["error"]["code"] == "invalid_key_case"


def test_8_only_allowlisted_headers_reach_azure(world: dict[str, Any]) -> None:
    w = world
    unsafe = {
        "X-Original-URL": "/openai/v1/files",
        "X-Rewrite-URL": "/openai/v1/files",
        "X-HTTP-Method-Override": "DELETE",
        "X-Forwarded-Port": "1",
        "X-Forwarded-Prefix": "/x",
        "X-Forwarded-Server": "x",
        "X-Forwarded-Ssl": "on",
        "X-Client-IP": "1.2.3.4",
        "True-Client-IP": "1.2.3.4",
        "x-ms-spillover-deployment": "dep-o3-swc",
        "OpenAI-Organization": "org",
        "Cookie": "a=b",
        "Connection": "keep-alive, x-stainless-lang",
        "X-Stainless-Lang": "python",
        "OpenAI-Beta": "responses=v1",
        "traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01",
        "idempotency-key": "k1",
    }
    r = httpx.post(
        w["gw"].url + "/openai/v1/responses",
        headers={"api-key": w["key_b"], **unsafe},
        json={"model": "gpt-4.1", "input": "x"},
    )
    assert r.status_code == 200, r.text
    sent = w["state"].api_requests()[-1].headers
    for name in unsafe:
        if name.lower() in ("openai-beta", "traceparent", "idempotency-key"):
            assert sent[name.lower()] == unsafe[name]
        else:  # x-stainless-lang is named in Connection: hop-by-hop by the client's word
            assert name.lower() not in sent, name


def test_9_cursors_and_has_more(world: dict[str, Any]) -> None:
    w = world
    # A cursor naming another team's file: the same answer as one that never existed.
    r1 = _refused(w, "GET", f"/openai/v1/files?after={w['file_a']}", 404)
    r2 = _refused(w, "GET", "/openai/v1/files?after=file-0123456789abcdef0123456789abcdef", 404)
    e1, e2 = r1.json()["error"], r2.json()["error"]
    assert (e1["code"], e1["param"], e1["type"]) == (e2["code"], e2["param"], e2["type"])
    # Other teams' files after b's own: b's page says no more.
    for i in range(3):
        w["a"].files.create(file=(f"a{i}.txt", io.BytesIO(b"a")), purpose="assistants")
    page = httpx.get(
        w["gw"].url + "/openai/v1/files?limit=1&order=asc", headers={"api-key": w["key_b"]}
    ).json()
    assert [d["id"] for d in page["data"]] == [w["file_b"]]
    assert page["has_more"] is False
    mine = w["b"].files.create(file=("b2.txt", io.BytesIO(b"b")), purpose="assistants")
    page = httpx.get(
        w["gw"].url + "/openai/v1/files?limit=1&order=asc", headers={"api-key": w["key_b"]}
    ).json()
    assert [d["id"] for d in page["data"]] == [w["file_b"]] and page["has_more"] is True
    nxt = httpx.get(
        w["gw"].url + f"/openai/v1/files?limit=1&order=asc&after={page['last_id']}",
        headers={"api-key": w["key_b"]},
    ).json()
    assert [d["id"] for d in nxt["data"]] == [mine.id] and nxt["has_more"] is False


def test_11_a_huge_limit_is_not_a_500(world: dict[str, Any]) -> None:
    w = world
    r = httpx.get(
        w["gw"].url + "/openai/v1/files?limit=" + "9" * 5000, headers={"api-key": w["key_b"]}
    )
    assert r.status_code < 500, r.text


def test_10_two_credentials(world: dict[str, Any], tenants: Tenants) -> None:
    w = world
    two = [("api-key", tenants.key("team-a")), ("api-key", w["key_b"])]
    before = len(w["state"].api_requests())
    r = httpx.post(
        w["gw"].url + "/openai/v1/responses",
        headers=httpx.Headers(two),
        json={"model": "gpt-4.1", "input": "x"},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "ambiguous_credentials"
    mixed = {"api-key": w["key_b"], "authorization": f"Bearer {tenants.key('team-a')}"}
    r = httpx.post(
        w["gw"].url + "/openai/v1/responses", headers=mixed, json={"model": "gpt-4.1", "input": "x"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "ambiguous_credentials"
    assert len(w["state"].api_requests()) == before


def test_12_errors_do_not_name_the_config(world: dict[str, Any]) -> None:
    w = world
    # Objects on different resources would name them; here one resource: an unknown
    # model and a foreign id are answered without a resource or deployment name.
    r = _refused(w, "POST", "/openai/v1/responses", 403, json={"model": "o3", "input": "x"})
    assert "dep-" not in r.text
