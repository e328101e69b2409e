"""Routing: fallback between regions, deployment rewriting everywhere, header hygiene."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from harness import Server, Sim, Tenants, base_config, gateway


@pytest.fixture
def two(identity: Sim, sim2: Sim, tenants: Tenants) -> Iterator[Server]:
    with gateway(base_config({"swc": identity, "fr": sim2}, tenants)) as server:
        yield server


def _post(gw: Server, key: str, body: dict[str, object], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/openai/v1/responses", json=body, headers={"api-key": key, **headers}
    )


@pytest.mark.parametrize("status", [429, 500, 503])
def test_fallback_on_refusal(
    two: Server, sim: Sim, sim2: Sim, tenants: Tenants, status: int
) -> None:
    sim.state.fail_queue.append(status)
    r = _post(two, tenants.key("team-a"), {"model": "gpt-4.1", "input": "x"})
    assert r.status_code == 200
    assert r.headers["x-ms-region"] == "francecentral"
    assert json.loads(sim2.state.api_requests()[-1].body)["model"] == "dep-41-fr"
    # the response is bound to the resource that made it
    rid = r.json()["id"]
    g = httpx.get(
        f"{two.url}/openai/v1/responses/{rid}", headers={"api-key": tenants.key("team-a")}
    )
    assert g.status_code == 200 and g.headers["x-ms-region"] == "francecentral"


def test_last_target_error_passes_through(
    two: Server, sim: Sim, sim2: Sim, tenants: Tenants
) -> None:
    sim.state.fail_queue.append(503)
    sim2.state.fail_queue.append(429)
    r = _post(two, tenants.key("team-a"), {"model": "gpt-4.1", "input": "x"})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"] == "Simulated upstream error 429."


def test_no_fallback_on_client_error(two: Server, sim: Sim, sim2: Sim, tenants: Tenants) -> None:
    sim.state.fail_queue.append(400)
    r = _post(two, tenants.key("team-a"), {"model": "gpt-4.1", "input": "x"})
    assert r.status_code == 400
    assert sim2.state.api_requests() == []


def test_fallback_on_connect_error(identity: Sim, sim2: Sim, tenants: Tenants) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = base_config({"swc": identity, "fr": sim2}, tenants)
    cfg["resources"]["swc"]["endpoint"] = f"http://127.0.0.1:{dead}"
    with gateway(cfg) as gw:
        r = _post(gw, tenants.key("team-a"), {"model": "gpt-4.1", "input": "x"})
    assert r.status_code == 200 and r.headers["x-ms-region"] == "francecentral"


def test_region_pin_skips_other_regions(identity: Sim, sim2: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity, "fr": sim2}, tenants)
    cfg["tenants"]["team-a"]["regions"] = ["francecentral"]
    with gateway(cfg) as gw:
        r = _post(gw, tenants.key("team-a"), {"model": "gpt-4.1", "input": "x"})
    assert r.status_code == 200 and r.headers["x-ms-region"] == "francecentral"
    assert identity.state.api_requests() == []


def test_previous_response_pins_the_resource(
    two: Server, sim: Sim, sim2: Sim, tenants: Tenants
) -> None:
    key = tenants.key("team-a")
    sim.state.fail_queue.append(503)
    first = _post(two, key, {"model": "gpt-4.1", "input": "x"}).json()
    assert first["id"] in sim2.state.responses
    # even with the first target healthy again, the chain goes where the response lives
    second = _post(
        two, key, {"model": "gpt-4.1", "input": "y", "previous_response_id": first["id"]}
    )
    assert second.status_code == 200 and second.headers["x-ms-region"] == "francecentral"


def test_every_deployment_name_is_checked_and_mapped(
    gw: Server, sim: Sim, tenants: Tenants
) -> None:
    key_a, key_b = tenants.key("team-a"), tenants.key("team-b")
    body = {
        "model": "gpt-4.1",
        "input": "draw",
        "tools": [{"type": "image_generation", "model": "gpt-image-1"}],
    }
    r = _post(gw, key_a, body, **{"x-ms-oai-image-generation-deployment": "gpt-image-1"})
    assert r.status_code == 200
    sent = sim.state.api_requests()[-1]
    assert json.loads(sent.body)["tools"][0]["model"] == "dep-img-swc"
    assert sent.headers["x-ms-oai-image-generation-deployment"] == "dep-img-swc"
    # team-b may use gpt-4.1 but not gpt-image-1: naming it anywhere is refused
    before = len(sim.state.api_requests())
    r = _post(gw, key_b, body)
    assert r.status_code == 403 and r.json()["error"]["param"] == "tools[0].model"
    r = _post(
        gw,
        key_b,
        {"model": "gpt-4.1", "input": "x"},
        **{"x-ms-oai-image-generation-deployment": "dep-img-swc"},
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "model_not_allowed"
    assert len(sim.state.api_requests()) == before


def test_header_hygiene(gw: Server, sim: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    r = _post(
        gw,
        key,
        {"model": "gpt-4.1", "input": "x"},
        **{
            "x-request-id": "client-req-1",
            "OpenAI-Beta": "responses=v1",
            "cookie": "s=1",
            "x-forwarded-for": "10.0.0.1",
            "connection": "keep-alive",
        },
    )
    sent = sim.state.api_requests()[-1].headers
    assert sent["openai-beta"] == "responses=v1"
    assert sent["x-request-id"] == "client-req-1"
    assert sent["x-ms-client-request-id"] == "client-req-1"
    assert "cookie" not in sent and "x-forwarded-for" not in sent and "api-key" not in sent
    assert r.headers["x-request-id"] == "client-req-1"
    assert r.headers["x-upstream-request-id"].startswith("sim_")
    assert r.headers["apim-request-id"].startswith("apim_")
    assert r.headers["x-ms-region"] == "swedencentral"
    assert not any(h.startswith("x-ratelimit-") and "4999" in v for h, v in r.headers.items())
    # a hostile request id is replaced, not reflected
    r = _post(gw, key, {"model": "gpt-4.1", "input": "x"}, **{"x-request-id": "a\tb" * 100})
    assert r.headers["x-request-id"] != "a\tb" * 100 and len(r.headers["x-request-id"]) == 32


def test_query_strings_are_forwarded(gw: Server, sim: Sim, tenants: Tenants) -> None:
    key = tenants.key("team-a")
    rid = _post(gw, key, {"model": "gpt-4.1", "input": "x"}).json()["id"]
    url = f"{gw.url}/openai/v1/responses/{rid}?include[]=message.output_text.logprobs&include[]=x"
    assert httpx.get(url, headers={"api-key": key}).status_code == 200
    assert sim.state.api_requests()[-1].query == (
        "include[]=message.output_text.logprobs&include[]=x"
    )
