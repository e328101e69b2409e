"""The access line: written directly or through logging, the same JSON either way."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.exchange import Exchange
from gateway.keys import Principal
from gateway.logs import AccessLog, JsonFormatter
from gateway.routing import Target


@pytest.fixture
def root_json() -> Iterator[io.StringIO]:
    """The root logger set up as ``gateway serve`` does, writing to a buffer."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def _exchange() -> Exchange:
    ex = Exchange(request_id="rid-1", operation="create", method="POST", client="10.0.0.1")
    ex.principal = Principal("team-a", "team-a-ci")
    ex.model = "gpt-4.1"
    ex.target = Target("swc", "https://x", "swedencentral", "dep")
    ex.status, ex.duration_seconds, ex.ttfb_seconds = 200, 0.0123, 0.004
    ex.usage = {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
    ex.response_id = "resp_\ud800"  # an upstream value orjson refuses: still written
    return ex


def test_direct_and_logging_paths_write_the_same_json(root_json: io.StringIO) -> None:
    AccessLog().finished(_exchange())  # only our JSON handler: the direct path
    direct = json.loads(root_json.getvalue())
    extra = logging.StreamHandler(io.StringIO())  # any other handler: through logging
    extra.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(extra)
    try:
        AccessLog().finished(_exchange())
    finally:
        logging.getLogger().removeHandler(extra)
    lines = root_json.getvalue().splitlines()
    assert len(lines) == 2
    via_logging = json.loads(lines[1])
    assert direct.pop("ts") and via_logging.pop("ts")
    assert direct == via_logging
    assert direct["logger"] == "gateway.access" and direct["status"] == 200
    assert direct["response_id"] == "resp_\ud800" and direct["total_tokens"] == 7
    assert direct["client_addr"] == "10.0.0.1"


def test_uvicorn_colour_codes_never_reach_json() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, "x", 1, "Started %s", ("x",), None)
    record.color_message = "Started \x1b[36m%s\x1b[0m"  # what uvicorn attaches
    line = JsonFormatter().format(record)
    assert "\x1b" not in line and "color_message" not in line
    assert json.loads(line)["msg"] == "Started x"


def test_usage_csv_money_has_every_digit() -> None:
    from gateway.usage import COLUMNS, render

    row = {c: 0 for c in COLUMNS}
    row.update(cost=0.000001, estimated_cost=12.5, ptu_cost=0.0, currency="EUR")
    text = render([row], "csv")
    assert "0.000001" in text and "1e-06" not in text and "12.500000" in text
