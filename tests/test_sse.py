"""The SSE tap (unit) and the relay's fidelity, latency and disconnect handling (real servers)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from harness import Server, Sim, Tenants, base_config, gateway

from gateway.simulator import build_response, encode_event, stream_events
from gateway.sse import SseTap


def _stream_bytes() -> bytes:
    resp = build_response({"model": "m"}, [{"content": [{"text": "a b c"}]}])
    return b"".join(encode_event(e) for e in stream_events(resp)), resp  # type: ignore[return-value]


@pytest.mark.parametrize("size", [1, 3, 7, 64, 100_000])
def test_tap_reads_any_chunking(size: int) -> None:
    raw, resp = _stream_bytes()  # type: ignore[misc]
    seen: list[str] = []
    tap = SseTap(lambda e: seen.append(e["type"]))
    for i in range(0, len(raw), size):
        tap.feed(raw[i : i + size])
    tap.close()
    assert tap.response_id == resp["id"]
    assert tap.usage == resp["usage"]
    assert tap.final_type == "response.completed"
    assert tap.events == len(stream_events(resp))
    assert "response.output_text.delta" not in seen  # deltas are never decoded
    assert seen[0] == "response.created" and seen[-1] == "response.completed"


def test_tap_crlf_multiline_and_unterminated() -> None:
    tap = SseTap()
    usage = {"total_tokens": 9}
    payload = json.dumps(
        {
            "type": "response.completed",
            "sequence_number": 4,
            "response": {"id": "r1", "usage": usage},
        }
    )
    half = len(payload) // 2
    tap.feed(b": keep-alive\r\n\r\nevent: response.completed\r\ndata: " + payload[:half].encode())
    tap.feed(b"\r\ndata: " + payload[half:].encode())  # a data field split over two lines
    tap.close()  # no trailing blank line
    assert tap.events == 1
    assert tap.usage is None  # the joined lines are not one JSON document: skipped, not crashed
    tap2 = SseTap()
    tap2.feed(b"data: " + payload.encode() + b"\r\n\r\n")
    assert tap2.usage == usage and tap2.last_sequence == 4


@pytest.mark.parametrize("kind", ["responses", "chat"])
def test_tap_survives_hostile_event_payloads(kind: str) -> None:
    """Nesting past any parser's depth, an integer beyond 64 bits, NaN: the tap reads what it
    can and goes on; the last event's usage still arrives."""
    usage = {"total_tokens": 2**70, "input_tokens": 1, "output_tokens": 1}
    final = {"type": "response.completed", "response": {"id": "r1", "usage": usage}}
    if kind == "chat":
        final = {"choices": [], "usage": usage}
    tap = SseTap(kind=kind)
    deep = b"[" * 200_000 + b"]" * 200_000
    tap.feed(b'data: {"usage": {"a": ' + deep + b"}}\n\n")
    tap.feed(b'data: {"type": "x", "usage": {"v": NaN}}\n\n')
    tap.feed(b"data: " + json.dumps(final).encode() + b"\n\n")
    tap.close()
    assert tap.events == 3
    assert tap.usage == usage  # read exactly, beyond what orjson takes


def test_stream_bytes_are_identical(gw: Server, sim: Sim, tenants: Tenants) -> None:
    sim.state.delay = 0.005
    received = bytearray()
    chunks = 0
    with httpx.stream(
        "POST",
        f"{gw.url}/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "the quick brown fox jumps", "stream": True},
        headers={"api-key": tenants.key("team-a")},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_raw():
            received += chunk
            chunks += 1
    assert chunks > 5
    assert bytes(received) == sim.state.sent_streams[-1]
    assert received.count(b"\n\n") == received.count(b"\nevent: ") + 1


def test_first_delta_arrives_long_before_the_end(gw: Server, sim: Sim, tenants: Tenants) -> None:
    started = time.monotonic()
    first_delta = None
    with httpx.stream(
        "POST",
        f"{gw.url}/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "w1 w2 w3 w4 w5 w6", "stream": True},
        headers={"api-key": tenants.key("team-a"), "x-sim-delay": "0.15"},
        timeout=30,
    ) as r:
        for chunk in r.iter_raw():
            if first_delta is None and b"output_text.delta" in chunk:
                first_delta = time.monotonic() - started
    total = time.monotonic() - started
    assert first_delta is not None
    assert total > 2.0
    assert first_delta < total - 1.0


def test_client_disconnect_closes_upstream(gw: Server, sim: Sim, tenants: Tenants) -> None:
    _disconnect_closes_upstream(gw, sim, tenants)


def test_client_disconnect_closes_upstream_under_another_server(
    identity: Sim, sim: Sim, tenants: Tenants
) -> None:
    """Without the gateway's protocol (no client-gone extension), the relay watches
    ``receive()`` for ``http.disconnect`` itself."""
    with gateway(base_config({"swc": identity}, tenants), stock=True) as stock:
        _disconnect_closes_upstream(stock, sim, tenants)


def _disconnect_closes_upstream(gw: Server, sim: Sim, tenants: Tenants) -> None:
    sim.state.sent_streams.clear()
    with httpx.stream(
        "POST",
        f"{gw.url}/openai/v1/responses",
        json={"model": "gpt-4.1", "input": " ".join(["w"] * 40), "stream": True},
        headers={"api-key": tenants.key("team-a"), "x-sim-delay": "0.1"},
    ) as r:
        next(r.iter_raw())
    # the upstream generator is closed well before its ~5 s of events are out
    deadline = time.monotonic() + 2
    while not sim.state.sent_streams and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.state.sent_streams, "upstream stream was not closed"
    assert b"response.completed" not in sim.state.sent_streams[-1]
