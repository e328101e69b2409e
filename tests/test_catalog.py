"""The models a key may use, answered by the gateway (``client.models.list()`` works);
paths clients get wrong get answers that say what to fix; requests are counted by
transport."""

from __future__ import annotations

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants, base_config, gateway


@pytest.fixture
def cgw(identity: Sim, sim2: Sim, tenants: Tenants) -> Server:  # type: ignore[misc]
    cfg = base_config({"swc": identity, "frc": sim2}, tenants)
    # o3 only in France, a batch-only model, and team-b pinned to Sweden.
    cfg["models"]["o3"] = [{"resource": "frc", "deployment": "dep-o3-frc"}]
    cfg["models"]["gpt-4.1-batch"] = [{"resource": "swc", "deployment": "b", "batch": True}]
    cfg["tenants"]["team-b"]["models"] = ["gpt-4.1*", "o3*"]
    cfg["tenants"]["team-b"]["regions"] = ["swedencentral"]
    with gateway(cfg) as server:
        yield server


def test_models_lists_what_the_key_can_call(cgw: Server, tenants: Tenants) -> None:
    a = openai.OpenAI(base_url=cgw.url + "/openai/v1/", api_key=tenants.key("team-a"))
    listed = [m.id for m in a.models.list()]
    assert listed == ["gpt-4.1", "gpt-4o-mini", "gpt-image-1", "gpt-4.1-batch"]  # config order
    b = openai.OpenAI(base_url=cgw.url + "/openai/v1/", api_key=tenants.key("team-b"))
    # o3 is allowed but only deployed outside team-b's regions; batch-only models count.
    assert [m.id for m in b.models.list()] == ["gpt-4.1", "gpt-4.1-batch"]
    one = b.models.retrieve("gpt-4.1")
    assert (one.id, one.object, one.owned_by) == ("gpt-4.1", "model", "gateway")
    assert isinstance(one.created, int)
    for hidden in ("o3", "gpt-4o-mini", "no-such-model"):  # not usable = not there
        with pytest.raises(openai.NotFoundError) as info:
            b.models.retrieve(hidden)
        assert info.value.code == "model_not_found"
    az = openai.AzureOpenAI(
        azure_endpoint=cgw.url, api_key=tenants.key("team-b"), api_version="2025-04-01-preview"
    )
    assert [m.id for m in az.models.list()] == ["gpt-4.1", "gpt-4.1-batch"]


def test_models_need_a_key_and_go_nowhere(cgw: Server, sim: Sim) -> None:
    r = httpx.get(cgw.url + "/openai/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert sim.state.api_requests() == []


def test_paths_clients_get_wrong_say_what_to_fix(gw: Server, sim: Sim, tenants: Tenants) -> None:
    key = {"api-key": tenants.key("team-a")}
    r = httpx.post(gw.url + "/v1/responses", json={"model": "gpt-4.1", "input": "x"}, headers=key)
    assert r.status_code == 404 and "/openai/v1/" in r.json()["error"]["message"]
    for path in ("/openai/responses", "/openai/deployments/gpt-4.1/chat/completions"):
        r = httpx.post(gw.url + path, json={"model": "gpt-4.1", "input": "x"}, headers=key)
        assert r.status_code == 400, path
        assert r.json()["error"]["code"] == "missing_api_version"
        assert r.json()["error"]["param"] == "api-version"
    r = httpx.get(gw.url + "/openai/models", headers=key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_api_version"
    assert sim.state.api_requests() == []


def test_requests_are_counted_by_transport(gw: Server, tenants: Tenants) -> None:
    c = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"))
    c.responses.create(model="gpt-4.1", input="x")
    with c.responses.connect() as conn:
        conn.response.create(model="gpt-4.1", input="y")
        for event in conn:
            if event.type == "response.completed":
                break
    metrics = httpx.get(gw.url + "/metrics").text
    base = 'gateway_requests_total{model="gpt-4.1",operation="create",status="200",tenant="team-a"'
    assert base + ',transport="http"} 1.0' in metrics
    assert base + ',transport="websocket"} 1.0' in metrics
