"""A gateway on the embedded durable backend (state.backend: sqlite) restarted: every id it
handed out is still its tenant's, runtime keys and revocations are as they were, and the
day's spend still counts against the budget."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from harness import Sim, Tenants, base_config, gateway

from gateway.keys import hash_key, new_key

ADMIN = new_key()


def test_a_restart_changes_nothing_a_team_can_see(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> None:
    cfg = base_config(
        {"swc": identity},
        tenants,
        state={"backend": "sqlite", "path": str(tmp_path / "state.db")},
        prices={"gpt-4.1": {"currency": "EUR", "input": 100_000, "output": 100_000}},
    )
    cfg["admin"] = {"key_sha256": hash_key(ADMIN)}
    # team-b's day budget is small: one response spends it.
    cfg["tenants"]["team-b"]["budgets"] = {"currency": "EUR", "per_day": 1}
    admin = {"api-key": ADMIN}
    with gateway(cfg) as gw:
        a = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"))
        b = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-b"))
        uploaded = a.files.create(file=("a.txt", b"kept"), purpose="assistants")
        made = a.responses.create(model="gpt-4.1", input="remember me")
        kept = httpx.post(
            gw.url + "/admin/keys", json={"tenant": "team-a", "name": "kept"}, headers=admin
        ).json()
        gone = httpx.post(
            gw.url + "/admin/keys", json={"tenant": "team-a", "name": "gone"}, headers=admin
        ).json()
        assert httpx.delete(gw.url + f"/admin/keys/{gone['id']}", headers=admin).status_code == 200
        b.responses.create(model="gpt-4.1", input="spends the day")
        with pytest.raises(openai.RateLimitError) as spent:
            b.responses.create(model="gpt-4.1", input="again")
        assert spent.value.code == "insufficient_quota"
    with gateway(cfg) as gw:  # a new process's worth of state: only the file is shared
        a = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"))
        b = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-b"))
        assert a.responses.retrieve(made.id).id == made.id
        assert a.files.retrieve(uploaded.id).id == uploaded.id
        assert [f.id for f in a.files.list()] == [uploaded.id]
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(made.id)
        headers = {"api-key": kept["key"]}
        body = {"model": "gpt-4.1", "input": "x"}
        assert (
            httpx.post(gw.url + "/openai/v1/responses", json=body, headers=headers).status_code
            == 200
        )
        headers = {"api-key": gone["key"]}
        assert (
            httpx.post(gw.url + "/openai/v1/responses", json=body, headers=headers).status_code
            == 401
        )
        with pytest.raises(openai.RateLimitError) as spent:  # the budget was not reset
            b.responses.create(model="gpt-4.1", input="after the restart")
        assert spent.value.code == "insufficient_quota"


def test_the_default_backend_is_a_state_file_and_memory_warns(
    identity: Sim, tenants: Tenants, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without `state:` the gateway keeps its state in gateway-state.db in the working
    directory; the memory backend, only when named, says at start and in /readyz that a
    restart forgets."""
    cfg = base_config({"swc": identity}, tenants)
    with gateway(cfg) as gw:
        a = openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=tenants.key("team-a"))
        a.responses.create(model="gpt-4.1", input="hi")
        ready = httpx.get(gw.url + "/readyz").json()
        assert ready["ready"] and "warnings" not in ready
    assert (tmp_path / "gateway-state.db").stat().st_size > 0
    caplog.set_level("WARNING", logger="gateway")
    with gateway(base_config({"swc": identity}, tenants, state={"backend": "memory"})) as gw:
        ready = httpx.get(gw.url + "/readyz")
        assert ready.status_code == 200 and ready.json()["ready"]
        (warning,) = ready.json()["warnings"]
        assert "memory" in warning and "restart forgets" in warning
    assert "restart forgets" in caplog.text
