"""Batch files as a property: whatever lines a tenant uploads (ids of every kind at random
depths and keys, models allowed or not, other case, duplicate keys, other urls), what
Azure stores holds only the tenant's own ids and only its allowed model's batch
deployment, read first-wins, last-wins and case-insensitively alike; a refused file
stores nothing; no answer is a 5xx."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import openai
from harness import Sim, Tenants, base_config, gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_isolation_property import _ids_in, _parse_three_ways, bodies

BATCH = "dep-41-batch"
URLS = ["/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/images/generations"]
# Weighted toward lines that pass, so that stored files are explored too.
MODELS = ["gpt-4.1"] * 6 + ["o3", "Gpt-4.1", "gpt-4o-mini", "dep-41-swc", BATCH]
TRICKS = ["plain"] * 6 + ["dup_model", "dup_url", "case_model"]


def test_no_foreign_id_or_deployment_reaches_a_stored_batch_file(
    identity: Sim, tenants: Tenants
) -> None:
    sim = identity
    cfg = base_config({"swc": sim}, tenants)
    cfg["models"]["gpt-4.1"].append({"resource": "swc", "deployment": BATCH, "batch": True})
    with gateway(cfg) as gw:
        a = openai.OpenAI(
            base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"), max_retries=0
        )
        b = openai.OpenAI(
            base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-b"), max_retries=0
        )

        def objects(c: openai.OpenAI, name: str) -> list[str]:
            return [
                c.files.create(file=(f"{name}.txt", io.BytesIO(b"x")), purpose="assistants").id,
                c.conversations.create().id,
                c.responses.create(model="gpt-4.1", input="x").id,
            ]

        foreign = objects(a, "a")
        own = objects(b, "b")
        never = ["file-0123456789abcdef0123456789abcdef", "resp_0123456789abcdef01234567"]
        pool = foreign + own + never
        client = httpx.Client(
            base_url=gw.url, headers={"api-key": tenants.key("team-b")}, timeout=10
        )
        outcomes = {"stored": 0, "refused": 0}

        @settings(
            max_examples=120,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(
            lines=st.lists(
                st.tuples(
                    bodies(pool) | bodies(own) | st.just({"input": "hello"}),
                    st.sampled_from(MODELS),
                    st.sampled_from(URLS[:3] * 3 + URLS[3:]),
                    st.sampled_from(TRICKS),
                ),
                min_size=1,
                max_size=3,
            )
        )
        def upload(lines: list[tuple[Any, str, str, str]]) -> None:
            raw = []
            for n, (body, model, url, trick) in enumerate(lines):
                text = json.dumps({**body, "model": model})
                if trick == "dup_model":  # a second model: first- and last-wins differ
                    text = text[:-1] + ', "model": "o3"}'
                elif trick == "case_model":
                    text = text[:-1] + ', "Model": "o3"}'
                line = f'{{"custom_id": "c{n}", "method": "POST", "url": "{url}", "body": {text}'
                if trick == "dup_url":
                    line += ', "url": "/v1/images/generations"'
                raw.append((line + "}").encode())
            before = len(sim.state.files)
            r = client.post(
                "/openai/v1/files",
                files={"file": ("in.jsonl", b"\n".join(raw), "application/jsonl")},
                data={"purpose": "batch"},
            )
            assert r.status_code < 500, r.text
            if r.status_code != 200:
                outcomes["refused"] += 1
                assert len(sim.state.files) == before  # nothing stored
                assert r.json()["error"]["message"].startswith("line ")
                return
            outcomes["stored"] += 1
            stored = sim.state.files[r.json()["id"]][1]
            for line in stored.splitlines():
                for reading in _parse_three_ways(line):
                    assert not _ids_in(reading) & (set(foreign) | set(never)), line
                    body = reading.get("body")
                    assert isinstance(body, dict) and body.get("model") == BATCH, line
                    assert reading.get("url") in URLS[:3]

        try:
            upload()
        finally:
            client.close()
    print(outcomes)
    assert outcomes["stored"] >= 3 and outcomes["refused"] >= 10  # both sides were explored
