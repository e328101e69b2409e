"""Tenant isolation: another tenant's response is 404, and the upstream never hears of it."""

from __future__ import annotations

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants


def _client(gw: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0)


def test_other_tenant_sees_nothing(gw: Server, sim: Sim, tenants: Tenants) -> None:
    a = _client(gw, tenants.key("team-a"))
    b = _client(gw, tenants.key("team-b"))
    resp = a.responses.create(model="gpt-4.1", input="secret plans", background=True)
    before = len(sim.state.api_requests())

    attempts = [
        lambda: b.responses.retrieve(resp.id),
        lambda: b.responses.delete(resp.id),
        lambda: b.responses.cancel(resp.id),
        lambda: b.responses.input_items.list(resp.id),
        lambda: b.responses.create(model="gpt-4.1", input="x", previous_response_id=resp.id),
        lambda: b.responses.compact(model="gpt-4.1", previous_response_id=resp.id),
    ]
    bodies = []
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError) as info:
            attempt()
        bodies.append(info.value.body)
    assert len(sim.state.api_requests()) == before, "nothing reached the upstream"
    # Indistinguishable from an id that never existed.
    with pytest.raises(openai.NotFoundError) as missing:
        b.responses.retrieve("resp_doesnotexist")
    assert missing.value.code == "not_found"
    assert all(body["code"] == "not_found" for body in bodies)  # type: ignore[index]
    # The owner still has it.
    assert a.responses.retrieve(resp.id).id == resp.id


def test_streamed_response_is_bound_to_its_tenant(gw: Server, tenants: Tenants) -> None:
    a = _client(gw, tenants.key("team-a"))
    events = list(a.responses.create(model="gpt-4.1", input="s", stream=True))
    rid = events[0].response.id  # type: ignore[union-attr]
    assert a.responses.retrieve(rid).id == rid
    with pytest.raises(openai.NotFoundError):
        _client(gw, tenants.key("team-b")).responses.retrieve(rid)


def test_path_tricks_are_not_found(gw: Server, sim: Sim, tenants: Tenants) -> None:
    before = len(sim.state.api_requests())
    headers = {"api-key": tenants.key("team-a")}
    for rid in ("..", "resp_1%2F..%2F..", "resp 1"):
        r = httpx.get(f"{gw.url}/openai/v1/responses/{rid}", headers=headers)
        assert r.status_code == 404, rid
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert len(sim.state.api_requests()) == before


def test_bindings_on_every_backend(
    identity: Sim, tenants: Tenants, backend: tuple[dict[str, object], dict[str, str]]
) -> None:
    """Created (JSON, stream, background) → the owner reaches it, another tenant gets 404."""
    from harness import base_config, gateway

    state, env = backend
    with gateway(base_config({"swc": identity}, tenants, state=state), env) as gw:
        a = _client(gw, tenants.key("team-a"))
        b = _client(gw, tenants.key("team-b"))
        ids = [
            a.responses.create(model="gpt-4.1", input="one").id,
            a.responses.create(model="gpt-4.1", input="two", background=True).id,
        ]
        with a.responses.stream(model="gpt-4.1", input="three") as s:
            ids.append(s.get_final_response().id)
        for rid in ids:
            assert a.responses.retrieve(rid).id == rid
            with pytest.raises(openai.NotFoundError):
                b.responses.retrieve(rid)
            follow = a.responses.create(model="gpt-4.1", input="more", previous_response_id=rid)
            assert follow.previous_response_id == rid
        a.responses.delete(ids[0])
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(ids[0])
