"""Every metric the Grafana dashboard and the alert rules query exists in /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from harness import Server, Tenants

DEPLOY = Path(__file__).parent.parent / "deploy" / "grafana"
_NAME = re.compile(r"\b((?:gateway|gen_ai)_[a-z_]+)\b")


def queried_metrics() -> set[str]:
    dash = json.loads((DEPLOY / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in _NAME.findall(e)}


def test_every_queried_metric_is_exposed(gw: Server, tenants: Tenants) -> None:
    httpx.post(
        f"{gw.url}/openai/v1/responses",
        json={"model": "gpt-4.1", "input": "x"},
        headers={"api-key": tenants.key("team-a")},
    )
    text = httpx.get(gw.url + "/metrics").text
    exposed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    # A histogram with no sample yet (no guardrail call in this test) still has its series.
    for name in re.findall(r"^# TYPE (\S+) histogram", text, re.M):
        exposed |= {name + suffix for suffix in ("_bucket", "_sum", "_count")}
    series = set(re.findall(r"^([a-z_:]+)", text, re.M))
    names = queried_metrics()
    assert len(names) >= 15
    missing = {n for n in names if n not in series and n not in exposed}
    assert not missing, f"queried but not exposed: {sorted(missing)}"
