"""The whole Responses surface through the gateway with the real openai clients."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import openai
import pytest
from harness import Server, Sim, Tenants


@pytest.fixture(params=["OpenAI", "AzureOpenAI"])
def client(request: pytest.FixtureRequest, gw: Server, tenants: Tenants) -> Iterator[openai.OpenAI]:
    key = tenants.key("team-a")
    if request.param == "OpenAI":
        c = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0)
    else:
        c = openai.AzureOpenAI(
            azure_endpoint=gw.url, api_key=key, api_version="2025-04-01-preview", max_retries=0
        )
    with c:
        yield c


def test_create_rewrites_model_to_deployment(client: openai.OpenAI, sim: Sim) -> None:
    resp = client.responses.create(model="gpt-4.1", input="hello world")
    assert resp.output_text == "Echo: hello world"
    assert resp.usage is not None and resp.usage.total_tokens > 0
    sent = sim.state.api_requests()[-1]
    assert json.loads(sent.body)["model"] == "dep-41-swc"


def test_paths_follow_the_client_form(client: openai.OpenAI, sim: Sim) -> None:
    client.responses.create(model="gpt-4.1", input="x")
    rec = sim.state.api_requests()[-1]
    if isinstance(client, openai.AzureOpenAI):
        assert rec.path == "/openai/responses" and "api-version=2025-04-01-preview" in rec.query
    else:
        assert rec.path == "/openai/v1/responses"


def test_stream_events_parse(client: openai.OpenAI) -> None:
    with client.responses.stream(model="gpt-4.1", input="one two three") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 4
    assert final.output_text == "Echo: one two three"


def test_raw_stream_flag(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4.1", input="a b", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_retrieve_delete(client: openai.OpenAI) -> None:
    resp = client.responses.create(model="gpt-4.1", input="keep me")
    assert client.responses.retrieve(resp.id).output_text == "Echo: keep me"
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_input_items_pagination(client: openai.OpenAI) -> None:
    resp = client.responses.create(
        model="gpt-4.1",
        input=[{"role": "user", "content": f"m{i}"} for i in range(3)],
    )
    page = client.responses.input_items.list(resp.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["m0", "m1"]  # type: ignore[union-attr]
    assert page.has_more
    rest = client.responses.input_items.list(resp.id, after=page.data[-1].id, order="asc")
    assert [i.content[0].text for i in rest.data] == ["m2"]  # type: ignore[union-attr]


def test_previous_response_chaining(client: openai.OpenAI, sim: Sim) -> None:
    first = client.responses.create(model="gpt-4.1", input="first")
    second = client.responses.create(model="gpt-4.1", input="second", previous_response_id=first.id)
    assert second.previous_response_id == first.id


def test_background_poll_and_cancel(client: openai.OpenAI, sim: Sim) -> None:
    sim.state.background_seconds = 0.3
    resp = client.responses.create(model="gpt-4.1", input="slow job", background=True)
    assert resp.status == "queued"
    deadline = time.monotonic() + 5
    while resp.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        resp = client.responses.retrieve(resp.id)
    assert resp.status == "completed"
    assert resp.output_text == "Echo: slow job"

    sim.state.background_seconds = 30
    other = client.responses.create(model="gpt-4.1", input="cancel me", background=True)
    cancelled = client.responses.cancel(other.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(other.id).status == "cancelled"


def test_background_stream_resume(client: openai.OpenAI, sim: Sim) -> None:
    sim.state.delay = 0.01
    stream = client.responses.create(model="gpt-4.1", input="a b c d", background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.sequence_number == 3:
            break
    stream.close()
    rid = seen[0].response.id  # type: ignore[union-attr]
    resumed = list(
        client.responses.retrieve(rid, stream=True, starting_after=3)  # type: ignore[call-overload]
    )
    assert resumed[0].sequence_number == 4
    assert resumed[-1].type == "response.completed"


def test_compact(client: openai.OpenAI) -> None:
    first = client.responses.create(model="gpt-4.1", input="long story")
    by_prev = client.responses.compact(model="gpt-4.1", previous_response_id=first.id)
    assert by_prev.object == "response.compaction"
    by_input = client.responses.compact(model="gpt-4.1", input="short story")
    assert by_input.usage is not None and by_input.usage.total_tokens > 0


def test_input_tokens(client: openai.OpenAI) -> None:
    counted = client.responses.input_tokens.count(model="gpt-4.1", input="one two three")
    assert counted.input_tokens == 8
