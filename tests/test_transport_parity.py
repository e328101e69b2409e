"""Transport parity, as a property: one generated request sent as an HTTP create, as a
Responses-socket ``response.create``, as a Realtime ``response.create`` and as a batch
line gets the same decision everywhere (the same refusal code and param, or admitted by
all), Azure receives the same checked body, and the audit trail holds the same MCP
records. A rule that one transport skips fails it (``test_a_transport_that_skips_a_rule``).

Params are compared inside each envelope: Realtime names them under ``response.``, a
batch line under ``line 1: body.``; each prefix is taken off before comparing.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Server, Sim, Tenants, base_config, gateway
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

MCP_OK = {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example.com/d"}
TOOLS = [
    {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}},
    {"type": "web_search"},
    {"type": "file_search", "vector_store_ids": []},  # a type the tenant may not use
    MCP_OK,
    {**MCP_OK, "server_label": "evil", "server_url": "https://evil.example/mcp"},
    {"type": "mcp", "server_label": "sp", "connector_id": "connector_sharepoint"},
    {**MCP_OK, "server_label": "both", "connector_id": "connector_gmail"},  # the connector fails
]
MODELS = ["gpt-4.1", "o3", "gpt-4-unknown"]  # allowed; not allowed; allowed by glob, unknown


class World:
    """A gateway, its simulator, and objects of team-a's and team-b's to name."""

    def __init__(self, gw: Server, sim: Sim, tenants: Tenants, audit: Path) -> None:
        self.gw, self.sim, self.audit = gw, sim, audit
        self.key = tenants.key("team-a")
        self.ws = gw.url.replace("http://", "ws://")
        made: dict[str, str] = {}
        for who in ("team-a", "team-b"):
            headers = {"api-key": tenants.key(who)}
            r = httpx.post(
                gw.url + "/openai/v1/responses",
                json={"model": "gpt-4.1", "input": "x"},
                headers=headers,
            )
            made[f"{who}/response"] = r.json()["id"]
            r = httpx.post(
                gw.url + "/openai/v1/files",
                files={"file": ("f.txt", b"hello")},
                data={"purpose": "assistants"},
                headers=headers,
            )
            made[f"{who}/file"] = r.json()["id"]
        self.ids = made


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from harness import simulator

    from gateway.simulator import IDENTITY_HEADER

    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("parity")
    with simulator() as sim:
        mp.setenv("IDENTITY_ENDPOINT", f"{sim.url}/msi/token")
        mp.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
        tenants = Tenants()
        audit = tmp / "audit.jsonl"
        state = {"backend": "sqlite", "path": str(tmp / "state.db")}
        cfg = base_config({"swc": sim}, tenants, audit={"path": str(audit)}, state=state)
        cfg["models"]["gpt-4.1"].append(
            {"resource": "swc", "deployment": "dep-41-batch", "batch": True}
        )
        team = cfg["tenants"]["team-a"]
        team["tools"] = {"allowed": ["function", "web_search", "mcp"]}
        team["mcp"] = {
            "allowed_servers": ["https://mcp.example.com/*", "connector_sharepoint"],
            "require_approval": "always",
        }
        cfg["batches"] = {"poll_seconds": 3600}
        # Guardrails: a prompt or a tool output the simulated Content Safety flags.
        cfg["content_safety"] = {"cs": {"endpoint": sim.url, "region": sim.state.region}}
        team["guardrails"] = {"prompt_shield": True, "documents": True}
        try:
            with gateway(cfg) as gw:
                yield World(gw, sim, tenants, audit)
        finally:
            mp.undo()


def _content(world: World, file_owner: str | None, depth: int) -> list[Any]:
    parts: list[Any] = [{"type": "input_text", "text": "hi"}]
    if file_owner is not None:
        part: Any = {"type": "input_file", "file_id": world.ids[f"{file_owner}/file"]}
        for _ in range(depth):  # an id at some depth, under keys the gateway does not read
            part = {"type": "input_text", "text": "x", "extra": {"nested": [part]}}
        parts.append(part)
    return parts


@st.composite
def requests(draw: st.DrawFn, world: World) -> tuple[str, dict[str, Any]]:
    """A create body as raw JSON text (duplicate or case-variant keys in the text)."""
    # Weighted so that about half of the requests pass every rule and are compared whole.
    body: dict[str, Any] = {"model": draw(st.sampled_from(MODELS[:1] * 8 + MODELS))}
    file_owner = draw(st.sampled_from([None, "team-a", "team-a", "team-b"]))
    depth = draw(st.integers(0, 2))
    items: list[Any] = [
        {"type": "message", "role": "user", "content": _content(world, file_owner, depth)}
    ]
    if draw(st.booleans()):
        items.append(
            {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True}
        )
    flagged = draw(st.sampled_from([None] * 6 + ["prompt", "document"]))
    if flagged == "prompt":
        items[0]["content"].append({"type": "input_text", "text": "JAILBREAK-TEST now"})
    elif flagged == "document":
        items.append(
            {"type": "function_call_output", "call_id": "c1", "output": "INDIRECT-ATTACK-TEST"}
        )
    body["input"] = items
    tools = draw(st.lists(st.sampled_from(TOOLS[:2] + TOOLS[3:4] + TOOLS[5:6] + TOOLS), max_size=3))
    if tools:
        body["tools"] = [dict(t) for t in tools]
    previous = draw(st.sampled_from([None, None, "team-a", "team-a", "team-b"]))
    if previous is not None:
        body["previous_response_id"] = world.ids[f"{previous}/response"]
    raw = json.dumps(body)
    twist = draw(st.sampled_from(["none"] * 8 + ["duplicate", "case"]))
    if twist == "duplicate":
        raw = '{"model": "o3", ' + raw[1:]
    elif twist == "case":
        raw = '{"Tools": [], ' + raw[1:]
    return raw, body


Decision = tuple[str, str | None]  # ("ok", None) or (code, param)


def _param(param: Any, *prefixes: str) -> str | None:
    if not isinstance(param, str):
        return None
    for prefix in prefixes:
        param = param.removeprefix(prefix)
    return param


def _records_since(world: World, start: int) -> tuple[int, list[tuple[Any, ...]]]:
    lines = world.audit.read_text().splitlines() if world.audit.exists() else []
    out = []
    for line in lines[start:]:
        r = json.loads(line)
        if r["event"] in ("mcp.tool", "mcp.approval", "mcp.policy") or r.get("source") == "input":
            out.append(
                (r["event"], r.get("server_label"), r.get("server_url"), r.get("connector_id"))
            )
    return len(lines), sorted(out, key=repr)


def _via_http(world: World, raw: str) -> tuple[Decision, Any]:
    r = httpx.post(
        world.gw.url + "/openai/v1/responses",
        content=raw,
        headers={"api-key": world.key, "content-type": "application/json"},
    )
    if r.status_code == 200:
        return ("ok", None), json.loads(world.sim.state.api_requests()[-1].body)
    error = r.json()["error"]
    return (error["code"], _param(error["param"])), None


def _via_socket(world: World, raw: str) -> tuple[Decision, Any]:
    before = len(world.sim.state.ws_frames)
    with connect(
        world.ws + "/openai/v1/responses", additional_headers={"api-key": world.key}
    ) as ws:
        ws.send('{"type": "response.create", ' + raw[1:])
        while True:
            event = json.loads(ws.recv(timeout=5))
            if event["type"] == "error":
                return (event["error"]["code"], _param(event["error"]["param"])), None
            if event["type"] == "response.completed":
                frame = json.loads(world.sim.state.ws_frames[before])
                frame.pop("type")
                return ("ok", None), frame


def _via_realtime(world: World, raw: str) -> tuple[Decision, Any]:
    before = len(world.sim.state.ws_frames)
    url = world.ws + "/openai/v1/realtime?model=gpt-4o-mini"
    with connect(url, additional_headers={"api-key": world.key}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
        ws.send('{"type": "response.create", "response": ' + raw + "}")
        while True:
            event = json.loads(ws.recv(timeout=5))
            if event["type"] == "error":
                error = event["error"]
                return (error["code"], _param(error["param"], "response.")), None
            if event["type"] == "response.done":
                return ("ok", None), json.loads(world.sim.state.ws_frames[before])["response"]


def _via_batch(world: World, raw: str) -> tuple[Decision, Any]:
    line = '{"custom_id": "c1", "method": "POST", "url": "/v1/responses", "body": ' + raw + "}"
    r = httpx.post(
        world.gw.url + "/openai/v1/files",
        files={"file": ("b.jsonl", line.encode() + b"\n")},
        data={"purpose": "batch"},
        headers={"api-key": world.key},
    )
    if r.status_code == 200:
        stored = world.sim.state.files[r.json()["id"]][1]
        return ("ok", None), json.loads(stored)["body"]
    error = r.json()["error"]
    return (error["code"], _param(error["param"], "line 1: ", "line 1", "body.")), None


TRANSPORTS = {
    "http": _via_http,
    "socket": _via_socket,
    "realtime": _via_realtime,
    "batch": _via_batch,
}


def _without_model(body: Any) -> Any:
    return {k: v for k, v in body.items() if k != "model"} if isinstance(body, dict) else body


def _check_parity(world: World, raw: str) -> None:
    decisions: dict[str, Decision] = {}
    bodies: dict[str, Any] = {}
    records: dict[str, list[tuple[Any, ...]]] = {}
    start, _ = _records_since(world, 0)
    for name, send in TRANSPORTS.items():
        decisions[name], bodies[name] = send(world, raw)
        start, records[name] = _records_since(world, start)
    assert len(set(decisions.values())) == 1, (decisions, raw)
    if decisions["http"][0] != "ok":
        assert all(r == [] for r in records.values()), records  # nothing audited, nothing sent
        return
    # Azure gets the same checked body (a batch line's model is the batch deployment).
    assert bodies["http"]["model"] == bodies["socket"]["model"] == bodies["realtime"]["model"]
    assert bodies["batch"]["model"] == "dep-41-batch"
    reference = _without_model(bodies["http"])
    for name in ("socket", "realtime", "batch"):
        assert _without_model(bodies[name]) == reference, (name, bodies[name], reference)
    assert len({json.dumps(r) for r in records.values()}) == 1, records


def test_every_transport_decides_alike(world: World) -> None:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(request=requests(world))
    def parity(request: tuple[str, dict[str, Any]]) -> None:
        _check_parity(world, request[0])

    parity()


def test_a_transport_that_skips_a_rule_breaks_parity(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The property has teeth: with the tool policy skipped for Realtime's events only (a
    transport with its own, partial copy of the rules), generated requests part ways."""
    import gateway.checks as checks
    import gateway.realtime as realtime

    lax = [False]
    policy, check = checks.check_tool_policy, checks.check

    def maybe_policy(*args: Any) -> Any:
        return [] if lax[0] else policy(*args)

    async def lax_check(*args: Any) -> Any:
        lax[0] = True
        try:
            return await check(*args)
        finally:
            lax[0] = False

    monkeypatch.setattr(checks, "check_tool_policy", maybe_policy)
    monkeypatch.setattr(realtime, "check", lax_check)

    @settings(
        max_examples=60,
        deadline=None,
        phases=[Phase.generate],
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(request=requests(world))
    def parity(request: tuple[str, dict[str, Any]]) -> None:
        _check_parity(world, request[0])

    random.seed(7)
    with pytest.raises(AssertionError) as info:
        parity()
    # Realtime decided otherwise than the others, or forwarded a tool unrewritten.
    text = str(info.value)
    assert "'realtime': (" in text or "('realtime'," in text, text


@pytest.mark.parametrize(
    ("item", "param"),
    [
        (
            {"role": "user", "content": [{"type": "input_text", "text": "JAILBREAK-TEST"}]},
            "input[0].content[0].text",
        ),
        (
            {"type": "function_call_output", "call_id": "c", "output": "INDIRECT-ATTACK-TEST"},
            "input[0].output",
        ),
    ],
)
def test_every_transport_runs_the_guardrails(
    world: World, item: dict[str, Any], param: str
) -> None:
    """A prompt or tool output Content Safety flags is refused alike on HTTP, both sockets
    and in a batch line, with Azure's content-filter code and the same part named."""
    raw = json.dumps({"model": "gpt-4.1", "input": [item]})
    for name, send in TRANSPORTS.items():
        decision, _ = send(world, raw)
        assert decision == ("content_filter", param), name
