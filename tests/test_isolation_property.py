"""The isolation invariant as a property: whatever a tenant sends (ids of every kind at
random depths, under random keys and ``type``s, in JSON and in forms, with random path
encodings), every id that reaches the upstream is the tenant's own, read by a
first-wins, a last-wins and a case-insensitive parser alike; no answer is a 5xx; and
the tenant's concurrency slot is free afterwards.
"""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import quote

import httpx
import openai
from harness import Sim, Tenants, base_config, gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.objects import shape_kind

# Keys a request may put ids under: the id keys, their case variants, and others;
# never free text (where an id is forwarded as text, by rule).
KEYS = [
    "file_id",
    "File_Id",
    "file_ids",
    "container_id",
    "previous_response_id",
    "conversation",
    "vector_store_ids",
    "id",
    "x",
    "source",
    "tools",
    "items",
    "type",
    "annotations",
]
TYPES = ["container_file_citation", "input_file", "file_citation", "mcp", "message", "x"]


def _ids_in(value: Any) -> set[str]:
    """Every id-shaped string (keys and values) anywhere in a parsed value."""
    found: set[str] = set()
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if shape_kind(node):
                found.add(node)
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _parse_three_ways(raw: bytes) -> list[Any]:
    def first(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            out.setdefault(k, v)
        return out

    def folded(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        return {k.lower(): v for k, v in pairs}

    text = raw.decode("utf-8", "replace")
    return [
        json.loads(text, object_pairs_hook=first),
        json.loads(text),
        json.loads(text, object_pairs_hook=folded),
    ]


@st.composite
def bodies(draw: st.DrawFn, pool: list[str]) -> Any:
    ids = st.sampled_from(pool)
    leaf = ids | st.sampled_from(["x", "", "file-reader", "resp_short"]) | st.integers(0, 3)
    tree = st.recursive(
        leaf,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
            | st.builds(
                lambda t, d: {"type": t, **d},
                st.sampled_from(TYPES),
                st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
            )
        ),
        max_leaves=8,
    )
    return draw(st.dictionaries(st.sampled_from(KEYS), tree, min_size=1, max_size=4))


def test_no_foreign_id_ever_reaches_the_upstream(identity: Sim, tenants: Tenants) -> None:
    sim = identity
    if True:
        cfg = base_config({"swc": sim}, tenants)
        cfg["tenants"]["team-b"]["quotas"] = {"max_concurrent_requests": 1}
        with gateway(cfg) as gw:
            a = openai.OpenAI(
                base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0
            )
            b = openai.OpenAI(
                base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-b"), max_retries=0
            )

            def objects(c: openai.OpenAI, name: str) -> list[str]:
                return [
                    c.files.create(file=(f"{name}.txt", io.BytesIO(b"x")), purpose="assistants").id,
                    c.conversations.create().id,
                    c.vector_stores.create(name=name).id,
                    c.containers.create(name=name).id,
                    c.responses.create(model="gpt-4.1", input="x").id,
                ]

            foreign = objects(a, "a")
            own = objects(b, "b")
            never = ["file-0123456789abcdef0123456789abcdef", "resp_0123456789abcdef01234567"]
            pool = foreign + own + never
            key_b = tenants.key("team-b")
            client = httpx.Client(base_url=gw.url, headers={"api-key": key_b}, timeout=10)
            paths = [
                ("POST", "/openai/v1/responses", "json"),
                ("POST", "/openai/v1/responses/input_tokens", "json"),
                ("POST", f"/openai/v1/vector_stores/{own[2]}/files", "json"),
                ("POST", "/openai/v1/conversations", "json"),
                ("POST", f"/openai/v1/containers/{own[3]}/files", "form"),
                ("POST", "/openai/v1/audio/transcriptions", "form"),
                ("GET", "/openai/v1/files/{id}", "path"),
                ("GET", f"/openai/v1/conversations/{own[1]}/items/{{id}}", "path"),
                ("GET", "/openai/v1/files", "query"),
            ]

            @settings(
                max_examples=120,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            )
            @given(
                route=st.sampled_from(paths),
                body=bodies(pool),
                oid=st.sampled_from(pool),
                encode=st.sampled_from(["plain", "once", "twice", "dots"]),
            )
            def attack(route: tuple[str, str, str], body: Any, oid: str, encode: str) -> None:
                method, path, how = route
                before = len(sim.state.requests)
                if how == "json":
                    if "model" not in body and path.endswith("/responses"):
                        body = {**body, "model": "gpt-4.1"}
                    r = client.request(method, path, json=body)
                elif how == "form":
                    fields = {"model": "gpt-4.1"}
                    for k, v in body.items():
                        fields.setdefault(k, json.dumps(v) if not isinstance(v, str) else v)
                    r = client.request(
                        method, path, data=fields, files={"file": ("a.wav", b"RIFF")}
                    )
                elif how == "path":
                    seg = {
                        "plain": oid,
                        "once": quote(oid, safe=""),
                        "twice": quote(quote("../" + oid, safe=""), safe=""),
                        "dots": "..%2F" + oid,
                    }[encode]
                    r = client.request(method, path.replace("{id}", seg))
                else:
                    r = client.request(method, path, params={"after": oid, "limit": "2"})
                assert r.status_code < 500, r.text
                for rec in sim.state.requests[before:]:
                    seen = _ids_in(rec.path.split("/")) | _ids_in(rec.query.split("="))
                    if rec.body.startswith(b"{"):
                        for reading in _parse_three_ways(rec.body):
                            seen |= _ids_in(reading)
                    else:
                        seen |= {i for i in pool if i.encode() in rec.body}
                    leaked = seen & (set(foreign) | set(never))
                    assert not leaked, (route, body, leaked)
                # The slot is free: a plain request is admitted at once.
                ok = client.post("/openai/v1/responses", json={"model": "gpt-4.1", "input": "x"})
                assert ok.status_code == 200, ok.text

            try:
                attack()
            finally:
                client.close()
