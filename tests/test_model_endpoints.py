"""Chat completions, completions, embeddings, images and audio through the gateway, on the
v1 paths (model in the body or form) and the deployments paths (model in the path)."""

from __future__ import annotations

import io
import json
import re
import time
from typing import Any

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants, base_config, gateway

API_VERSION = "2025-04-01-preview"


def _v1(gw: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0)


def _azure(gw: Server, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=gw.url, api_key=key, api_version=API_VERSION, max_retries=0
    )


def _tokens(gw: Server, tenant: str, kind: str) -> float:
    text = httpx.get(gw.url + "/metrics").text
    pattern = rf'gateway_tokens_total{{kind="{kind}",model="[^"]+",tenant="{tenant}"}} ([0-9.e+]+)'
    return sum(float(m) for m in re.findall(pattern, text))


@pytest.fixture(params=["v1", "deployments"])
def client(request: pytest.FixtureRequest, gw: Server, tenants: Tenants) -> Any:
    key = tenants.key("team-a")
    return _v1(gw, key) if request.param == "v1" else _azure(gw, key)


def _last(sim: Sim) -> Any:
    return sim.state.api_requests()[-1]


def test_chat_completions_both_forms(client: Any, gw: Server, sim: Sim) -> None:
    before = _tokens(gw, "team-a", "input")
    out = client.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "hello there"}]
    )
    assert out.choices[0].message.content == "Echo: hello there"
    req = _last(sim)
    if isinstance(client, openai.AzureOpenAI):
        assert req.path == "/openai/deployments/dep-41-swc/chat/completions"
        assert req.query == f"api-version={API_VERSION}"
    else:
        assert req.path == "/openai/v1/chat/completions"
    assert b'"model":"dep-41-swc"' in req.body
    assert b"gpt-4.1" not in req.body
    assert _tokens(gw, "team-a", "input") == before + out.usage.prompt_tokens
    # Image input and per-request options pass through.
    image = client.with_options(timeout=10).chat.completions.create(
        model="gpt-4.1",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                ],
            }
        ],
    )
    assert image.choices[0].message.content == "Echo: what is this"


def test_chat_stream_is_byte_identical_and_charged(client: Any, gw: Server, sim: Sim) -> None:
    before = _tokens(gw, "team-a", "output")
    url_prefix = (
        "/openai/deployments/gpt-4.1" if isinstance(client, openai.AzureOpenAI) else "/openai/v1"
    )
    query = f"?api-version={API_VERSION}" if isinstance(client, openai.AzureOpenAI) else ""
    body = {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "count to three"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST",
        f"{gw.url}{url_prefix}/chat/completions{query}",
        json=body,
        headers={"api-key": client.api_key},
    ) as r:
        got = b"".join(r.iter_raw())
    assert r.status_code == 200
    assert got == sim.state.sent_streams[-1]
    assert got.endswith(b"data: [DONE]\n\n")
    sent = _last(sim).body
    assert b"stream_options" in sent and sent.count(b"include_usage") == 1
    assert _tokens(gw, "team-a", "output") > before
    # The SDK reads the same stream.
    chunks = list(
        client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "a b"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: a b"
    # Without a usage chunk the gateway never asks for one: the stream is estimated.
    assert b"stream_options" not in _last(sim).body
    metrics = httpx.get(gw.url + "/metrics").text
    assert re.search(
        r'gateway_estimated_tokens_total{model="gpt-4.1",tenant="team-a"} [1-9]', metrics
    )


def test_embeddings_images_audio_completions(client: Any, gw: Server, sim: Sim) -> None:
    azure = isinstance(client, openai.AzureOpenAI)
    emb = client.embeddings.create(model="gpt-4.1", input=["one two", "three"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens == 3
    assert _last(sim).path.endswith(("/deployments/dep-41-swc/embeddings", "/v1/embeddings"))

    img = client.images.generate(model="gpt-image-1", prompt="a cat")
    assert img.data[0].b64_json
    assert b'"model":"dep-img-swc"' in _last(sim).body or "dep-img-swc" in _last(sim).path

    wav = b"RIFF" + b"\x00" * 2000
    text = client.audio.transcriptions.create(model="gpt-4o-mini", file=("a.wav", io.BytesIO(wav)))
    req = _last(sim)
    assert text.text.startswith(f"{len(wav)} bytes of ")
    assert wav in req.body
    if azure:
        assert req.path == "/openai/deployments/dep-4om-swc/audio/transcriptions"
    else:
        assert b'name="model"\r\n\r\ndep-4om-swc\r\n' in req.body

    edit = client.images.edit(model="gpt-image-1", image=("i.png", b"\x89PNG"), prompt="hat")
    assert edit.data[0].b64_json

    speech = client.audio.speech.create(model="gpt-4o-mini", voice="alloy", input="hi")
    from gateway.simulator import SPEECH

    assert speech.read() == SPEECH

    comp = client.completions.create(model="gpt-4.1", prompt="say this")
    assert comp.choices[0].text == "Echo: say this"


def test_policy_applies_to_the_path_form(gw: Server, sim: Sim, tenants: Tenants) -> None:
    b = _azure(gw, tenants.key("team-b"))  # allowed gpt-4.1 only
    with pytest.raises(openai.PermissionDeniedError) as info:
        b.chat.completions.create(model="o3", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as raw:
        b.embeddings.create(model="dep-41-swc", input="x")  # a raw deployment name
    assert raw.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        b.audio.transcriptions.create(model="gpt-4o-mini", file=("a.wav", b"RIFF"))
    assert sim.state.api_requests() == []


def test_residency_on_the_path_form(identity: Sim, sim2: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity, "frc": sim2}, tenants)
    cfg["tenants"]["team-b"]["regions"] = ["francecentral"]
    with gateway(cfg) as gw:
        b = _azure(gw, tenants.key("team-b"))
        out = b.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "x"}]
        )
        assert out.choices[0].message.content == "Echo: x"
        assert identity.state.api_requests() == []
        assert (
            sim2.state.api_requests()[-1].path == "/openai/deployments/dep-41-frc/chat/completions"
        )


def test_form_without_model_or_boundary(gw: Server, sim: Sim, tenants: Tenants) -> None:
    headers = {"api-key": tenants.key("team-a")}
    r = httpx.post(
        gw.url + "/openai/v1/audio/transcriptions",
        headers=headers,
        files={"file": ("a.wav", b"RIFF")},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(
        gw.url + "/openai/v1/audio/transcriptions",
        headers={**headers, "content-type": "application/json"},
        content=b"{}",
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert sim.state.api_requests() == []


def test_transcription_stream_relayed_as_is(gw: Server, sim: Sim, tenants: Tenants) -> None:
    """An audio stream has no Responses terminal event: nothing is appended, usage read."""
    before = _tokens(gw, "team-a", "output")
    with httpx.stream(
        "POST",
        gw.url + "/openai/v1/audio/transcriptions",
        headers={"api-key": tenants.key("team-a")},
        data={"model": "gpt-4o-mini", "stream": "true"},
        files={"file": ("a.wav", b"RIFF" * 10)},
    ) as r:
        got = b"".join(r.iter_raw())
    assert r.status_code == 200
    assert got == sim.state.sent_streams[-1]
    assert b"error" not in got
    assert _tokens(gw, "team-a", "output") == before + 6


def test_chat_stream_cut_by_the_client_is_estimated_and_closed(
    gw: Server, sim: Sim, tenants: Tenants
) -> None:
    before = len(sim.state.sent_streams)
    with httpx.stream(
        "POST",
        gw.url + "/openai/v1/chat/completions",
        json={
            "model": "gpt-4.1",
            "messages": [{"role": "user", "content": " ".join(["w"] * 60)}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"api-key": tenants.key("team-a"), "x-sim-delay": "0.05"},
    ) as r:
        next(r.iter_raw())
    deadline = time.monotonic() + 3
    while len(sim.state.sent_streams) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(sim.state.sent_streams) > before, "the upstream stream was not closed"
    assert b"[DONE]" not in sim.state.sent_streams[-1]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        metrics = httpx.get(gw.url + "/metrics").text
        if "gateway_inflight_requests 0.0" in metrics:
            break
        time.sleep(0.02)
    assert re.search(
        r'gateway_streams_interrupted_total{model="gpt-4.1",tenant="team-a"} [1-9]', metrics
    )
    assert re.search(
        r'gateway_estimated_tokens_total{model="gpt-4.1",tenant="team-a"} [1-9]', metrics
    )


def test_chat_stream_without_done_gets_a_chat_error_chunk(tenants: Tenants) -> None:
    from harness import serving
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from test_hardening import _api_key_cfg

    async def broken(request: Request) -> Response:
        chunk = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": "hal"}, "finish_reason": None}],
        }
        return Response(
            b"data: " + json.dumps(chunk).encode() + b"\n\n", media_type="text/event-stream"
        )

    app = Starlette(routes=[Route("/openai/v1/chat/completions", broken, methods=["POST"])])
    with serving(app) as up, gateway(_api_key_cfg(up.url, tenants), {"K": "k"}) as gw:
        client = _v1(gw, tenants.key("team-a"))
        stream = client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError) as info:
            for _ in stream:
                pass
        assert "without a terminal event" in str(info.value)
