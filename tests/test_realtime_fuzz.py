"""Realtime client events as a property (hypothesis): random events of every documented
type and others, with ids of this and another tenant, models, tools and case-variant keys
at random places. Whatever comes: the socket stays open and serving, every refusal is a
well-formed error event, and nothing that reaches Azure names another tenant's object or
a model that is not a deployment."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from harness import Server, Sim, Tenants, base_config, gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from gateway.objects import FREE_FORM, FREE_TEXT
from gateway.realtime import CLIENT_EVENTS

DEPLOYMENTS = {"dep-41-swc", "dep-4om-swc", "dep-img-swc", "dep-o3-swc"}


@pytest.fixture
def fuzzed(identity: Sim, tenants: Tenants) -> Iterator[tuple[Server, str]]:
    cfg = base_config({"swc": identity}, tenants)
    cfg["tenants"]["team-a"]["mcp"] = {"allowed_servers": ["https://mcp.example.com/*"]}
    with gateway(cfg) as gw:
        other = httpx.post(
            gw.url + "/openai/v1/files",
            files={"file": ("x.txt", b"hello")},
            data={"purpose": "assistants"},
            headers={"api-key": tenants.key("team-b")},
        ).json()["id"]
        yield gw, other


def _events(foreign: str) -> st.SearchStrategy[Any]:
    leaf = (
        st.sampled_from(
            [
                foreign,
                "gpt-4.1",
                "o3",
                "auto",
                "none",
                "hello",
                "https://evil.example/mcp",
                "https://mcp.example.com/x",
                "connector_gmail",
            ]
        )
        | st.integers(-5, 5)
        | st.booleans()
        | st.none()
    )
    keys = st.sampled_from(
        [
            "model",
            "Model",
            "tools",
            "type",
            "file_id",
            "previous_response_id",
            "server_url",
            "connector_id",
            "input",
            "content",
            "text",
            "metadata",
            "conversation",
            "audio",
            "item",
        ]
    )
    values = st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=10,
    )
    kinds = st.sampled_from([*sorted(CLIENT_EVENTS), "session.create", "Session.update", ""])
    return st.builds(
        lambda kind, body: {"type": kind, **body},
        kinds,
        st.dictionaries(
            st.sampled_from(["session", "response", "item", "event_id", "audio"]),
            values,
            max_size=3,
        ),
    )


def _names_of(value: Any, out: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Every (key, value) the gateway reads as more than text: free-form subtrees
    (metadata, schemas) are data, and a string (or strings) right under a free-text key
    (input, content, text the model reads) is text, never an id — the documented rule."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in FREE_FORM:
                continue
            text = k in FREE_TEXT and (
                isinstance(v, str) or (isinstance(v, list) and all(isinstance(i, str) for i in v))
            )
            if not text:
                out.append((k, v))
                _names_of(v, out)
    elif isinstance(value, list):
        for v in value:
            _names_of(v, out)
    return out


def test_random_client_events_never_get_past_the_rules(
    fuzzed: tuple[Server, str], identity: Sim, tenants: Tenants
) -> None:
    gw, foreign = fuzzed
    url = gw.url.replace("http://", "ws://") + "/openai/v1/realtime?model=gpt-4o-mini"
    key = tenants.key("team-a")

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(events=st.lists(_events(foreign), min_size=1, max_size=4))
    def run(events: list[dict[str, Any]]) -> None:
        with connect(url, additional_headers={"api-key": key}) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
            for event in events:
                ws.send(json.dumps(event))
            # Still open and serving: a good event is answered after whatever came before.
            ws.send(json.dumps({"type": "session.update", "session": {}}))
            while True:
                answer = json.loads(ws.recv(timeout=5))
                if answer["type"] == "error":
                    error = answer["error"]
                    assert {"type", "code", "message", "param"} <= set(error), error
                    assert isinstance(error["message"], str) and error["message"]
                if answer["type"] == "session.updated":
                    break

    run()
    for frame in identity.state.ws_frames:
        sent = json.loads(frame)
        assert sent["type"] in CLIENT_EVENTS
        for name, value in _names_of(sent, []):
            # No other tenant's object reaches Azure where an id can be read.
            assert value != foreign and foreign not in (value if isinstance(value, list) else []), (
                sent
            )
            if name == "model" and value is not None:
                assert value in DEPLOYMENTS, sent  # every model mapped to a deployment
            assert name != "Model", sent  # a case variant of a key the gateway reads
    metrics = httpx.get(gw.url + "/metrics").text
    assert "gateway_requests_total" in metrics
