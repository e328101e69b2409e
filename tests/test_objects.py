"""Conversations, compaction results, containers and stale reads: bound to their tenant
on create, usable by it, 404 for everyone else with nothing sent upstream."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants, base_config, gateway

from gateway.logs import JsonFormatter


def _v1(gw: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0)


def test_conversations(gw: Server, sim: Sim, tenants: Tenants) -> None:
    a = _v1(gw, tenants.key("team-a"))
    b = _v1(gw, tenants.key("team-b"))
    conv = a.conversations.create(
        items=[{"type": "message", "role": "user", "content": "remember: blue"}],
        metadata={"topic": "colours"},
    )
    a.conversations.items.create(
        conv.id, items=[{"type": "message", "role": "user", "content": "and green"}]
    )
    resp = a.responses.create(model="gpt-4.1", input="which colours?", conversation=conv.id)
    assert resp.status == "completed"
    items = list(a.conversations.items.list(conv.id, order="asc"))
    assert len(items) == 4  # two added, the input, the answer
    assert a.conversations.retrieve(conv.id).metadata == {"topic": "colours"}
    assert a.conversations.update(conv.id, metadata={"topic": "x"}).metadata == {"topic": "x"}
    item_id = items[0].id
    assert a.conversations.items.retrieve(item_id, conversation_id=conv.id).id == item_id

    before = len(sim.state.api_requests())
    for param, attempt in [
        ("conversation_id", lambda: b.conversations.retrieve(conv.id)),
        ("conversation_id", lambda: b.conversations.update(conv.id, metadata={})),
        ("conversation_id", lambda: b.conversations.delete(conv.id)),
        ("conversation_id", lambda: b.conversations.items.list(conv.id)),
        (
            "conversation_id",
            lambda: b.conversations.items.retrieve(item_id, conversation_id=conv.id),
        ),
        (
            "conversation_id",
            lambda: b.conversations.items.create(
                conv.id, items=[{"type": "message", "role": "user", "content": "x"}]
            ),
        ),
        (
            "conversation",
            lambda: b.responses.create(model="gpt-4.1", input="x", conversation=conv.id),
        ),
        (
            "conversation.id",
            lambda: b.responses.create(model="gpt-4.1", input="x", conversation={"id": conv.id}),
        ),
    ]:
        with pytest.raises(openai.NotFoundError) as info:
            attempt()
        assert isinstance(info.value.body, dict) and info.value.body["param"] == param
    assert len(sim.state.api_requests()) == before
    assert a.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.conversations.retrieve(conv.id)


def test_compaction_result_is_owned(gw: Server, sim: Sim, tenants: Tenants) -> None:
    a = _v1(gw, tenants.key("team-a"))
    b = _v1(gw, tenants.key("team-b"))
    first = a.responses.create(model="gpt-4.1", input="a long story")
    compacted = a.responses.compact(model="gpt-4.1", previous_response_id=first.id)
    assert compacted.id and compacted.id != first.id
    assert a.responses.retrieve(compacted.id).id == compacted.id
    follow = a.responses.create(model="gpt-4.1", input="go on", previous_response_id=compacted.id)
    assert follow.status == "completed"
    before = len(sim.state.api_requests())
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(compacted.id)
    with pytest.raises(openai.NotFoundError) as info:
        b.responses.create(model="gpt-4.1", input="x", previous_response_id=compacted.id)
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "previous_response_id"
    assert len(sim.state.api_requests()) == before


def test_code_interpreter_container_is_owned(gw: Server, sim: Sim, tenants: Tenants) -> None:
    a = _v1(gw, tenants.key("team-a"))
    b = _v1(gw, tenants.key("team-b"))
    resp = a.responses.create(
        model="gpt-4.1",
        input="plot it",
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
    )
    call = next(o for o in resp.output if o.type == "code_interpreter_call")
    cid = call.container_id
    files = list(a.containers.files.list(cid))
    assert len(files) == 1
    png = a.containers.files.content.retrieve(files[0].id, container_id=cid).read()
    assert png.startswith(b"\x89PNG")
    # Streamed responses bind their containers too.
    with a.responses.stream(
        model="gpt-4.1",
        input="again",
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
    ) as stream:
        final = stream.get_final_response()
    streamed = next(o for o in final.output if o.type == "code_interpreter_call").container_id
    assert a.containers.retrieve(streamed).id == streamed
    # Reusing the container by id is the owner's right only.
    again = a.responses.create(
        model="gpt-4.1", input="x", tools=[{"type": "code_interpreter", "container": cid}]
    )
    assert again.status == "completed"
    before = len(sim.state.api_requests())
    for param, attempt in [
        ("container_id", lambda: b.containers.retrieve(cid)),
        ("container_id", lambda: b.containers.files.list(cid)),
        (
            "container_id",
            lambda: b.containers.files.content.retrieve(files[0].id, container_id=cid),
        ),
        (
            "tools[0].container",
            lambda: b.responses.create(
                model="gpt-4.1", input="x", tools=[{"type": "code_interpreter", "container": cid}]
            ),
        ),
    ]:
        with pytest.raises(openai.NotFoundError) as info:
            attempt()
        assert isinstance(info.value.body, dict) and info.value.body["param"] == param
    assert len(sim.state.api_requests()) == before
    # Lists show only the tenant's containers.
    mine = b.containers.create(name="b's")
    assert [c.id for c in b.containers.list()] == [mine.id]


def test_stale_read_is_retried_on_the_same_resource(
    identity: Sim, sim2: Sim, tenants: Tenants
) -> None:
    cfg = base_config(
        {"swc": identity, "frc": sim2},
        tenants,
        upstream={"read_timeout": 5.0, "stale_read_backoff_seconds": 0.01},
    )
    with gateway(cfg) as gw:
        a = _v1(gw, tenants.key("team-a"))
        first = a.responses.create(model="gpt-4.1", input="x")
        identity.state.stale_reads = 2
        follow = a.responses.create(model="gpt-4.1", input="y", previous_response_id=first.id)
        assert follow.status == "completed"
        assert identity.state.stale_reads == 0
        assert sim2.state.api_requests() == []  # never tried elsewhere
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'gateway_stale_read_retries_total{operation="create",resource="swc"} 2.0' in metrics
        # By id too; and a real absence still ends as 404 after the bounded retries.
        identity.state.stale_reads = 1
        assert a.responses.retrieve(first.id).id == first.id
        assert identity.state.stale_reads == 0
        identity.state.stale_reads = 10
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(first.id)
        assert identity.state.stale_reads == 10 - 4  # the first try and 3 retries
        # Nothing named: no retry (the 400 is the client's to fix).
        identity.state.stale_reads = 0
        calls = len(identity.state.api_requests())
        r = httpx.get(
            gw.url + "/openai/v1/files/file-nope", headers={"api-key": tenants.key("team-a")}
        )
        assert r.status_code == 404
        assert len(identity.state.api_requests()) == calls  # not bound: never asked


def test_unknown_path_is_logged_and_counted(
    gw: Server, sim: Sim, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    key = tenants.key("team-a")
    r = httpx.post(gw.url + "/openai/v1/assistants", headers={"api-key": key}, json={})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "unknown_path" and "/openai/v1/assistants" in err["message"]
    assert r.headers["x-request-id"]
    r = httpx.get(gw.url + "/nothing-here")
    assert r.status_code == 404
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'operation="unknown",status="404",tenant="team-a"' in metrics
    assert sim.state.api_requests() == []
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    access = [x for x in lines if x["logger"] == "gateway.access"]
    assert [(x["operation"], x["status"], x["path"], x["tenant"]) for x in access[:2]] == [
        ("unknown", 404, "/openai/v1/assistants", "team-a"),
        ("unknown", 404, "/nothing-here", None),
    ]
    assert key not in caplog.text


def test_ownership_on_every_backend(
    identity: Sim, tenants: Tenants, backend: tuple[dict[str, object], dict[str, str]]
) -> None:
    """Bindings of every kind live in the state backend; with Redis a second replica
    enforces them (with memory, the one replica does)."""
    state, environ = backend
    cfg = base_config({"swc": identity}, tenants, state=state)
    shared = state["backend"] == "redis"  # one replica on the embedded backends
    with gateway(cfg, environ) as one, gateway(cfg, environ) if shared else nullcontext(one) as two:
        a1 = _v1(one, tenants.key("team-a"))
        f = a1.files.create(file=("a.txt", b"a"), purpose="assistants")
        conv = a1.conversations.create()
        store = a1.vector_stores.create(name="s", file_ids=[f.id])
        a2 = _v1(two, tenants.key("team-a"))
        b2 = _v1(two, tenants.key("team-b"))
        assert a2.files.content(f.id).read() == b"a"
        assert a2.conversations.retrieve(conv.id).id == conv.id
        assert [s.id for s in a2.vector_stores.list()] == [store.id]
        assert list(b2.vector_stores.list()) == []
        assert list(b2.files.list()) == []
        before = len(identity.state.api_requests())
        with pytest.raises(openai.NotFoundError):
            b2.files.retrieve(f.id)
        with pytest.raises(openai.NotFoundError):
            b2.conversations.retrieve(conv.id)
        assert len(identity.state.api_requests()) == before
        assert a2.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            a1.files.retrieve(f.id)  # forgotten on the other replica too


def test_an_id_of_another_kind_is_not_found(gw: Server, sim: Sim, tenants: Tenants) -> None:
    """A tenant's own conversation id used as a file or vector store is refused at once."""
    a = _v1(gw, tenants.key("team-a"))
    conv = a.conversations.create()
    before = len(sim.state.api_requests())
    with pytest.raises(openai.NotFoundError) as info:
        a.files.retrieve(conv.id)
    assert isinstance(info.value.body, dict) and "No file found" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        a.responses.create(model="gpt-4.1", input="x", previous_response_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        a.vector_stores.create(name="s", file_ids=[conv.id])
    assert len(sim.state.api_requests()) == before


def test_an_id_with_a_trailing_newline_is_no_id(gw: Server, sim: Sim, tenants: Tenants) -> None:
    """``$`` in an id pattern matches before a final newline: the gateway matches ids whole,
    so an owned id plus ``%0A`` in a path or a body is a 404, and nothing goes upstream."""
    key = {"api-key": tenants.key("team-a")}
    made = httpx.post(
        gw.url + "/openai/v1/responses", json={"model": "gpt-4.1", "input": "x"}, headers=key
    ).json()["id"]
    before = len(sim.state.api_requests())
    r = httpx.get(gw.url + f"/openai/v1/responses/{made}%0A", headers=key)
    assert r.status_code == 404
    body = {"model": "gpt-4.1", "input": "x", "previous_response_id": made + "\n"}
    r = httpx.post(gw.url + "/openai/v1/responses", json=body, headers=key)
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    assert len(sim.state.api_requests()) == before
