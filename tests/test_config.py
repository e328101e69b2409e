"""Config validation: each class of bad config names the field that is wrong."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config, parse_config

HASH = "a" * 64
GOOD: dict[str, Any] = {
    "resources": {
        "swc": {"endpoint": "https://contoso-swc.openai.azure.com", "region": "swedencentral"}
    },
    "models": {"gpt-4.1": [{"resource": "swc", "deployment": "gpt-41-prod"}]},
    "tenants": {
        "team-a": {
            "keys": [{"id": "a1", "sha256": HASH}],
            "models": ["gpt-4.1"],
            "quotas": {"requests_per_minute": 10},
        }
    },
}


def _bad(mutate: Any, environ: dict[str, str] | None = None) -> str:
    cfg = copy.deepcopy(GOOD)
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, environ or {})
    return str(info.value)


def test_good_config_loads() -> None:
    loaded = parse_config(GOOD, {})
    assert loaded.config.resources["swc"].scope == "https://cognitiveservices.azure.com/.default"
    assert loaded.config.server.max_body_bytes == 50 * 1024 * 1024
    assert loaded.config.state.response_retention_days == 30


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(extra=1), "extra: unknown key"),
        (
            lambda c: c["tenants"]["team-a"].update(modles=["x"]),
            "tenants.team-a.modles: unknown key (did you mean 'models'?)",
        ),
        (
            lambda c: c["models"]["gpt-4.1"][0].update(resource="nope"),
            "models.gpt-4.1[0].resource: unknown resource 'nope'",
        ),
        (lambda c: c["resources"]["swc"].update(endpoint="ftp://x"), "resources.swc.endpoint"),
        (
            lambda c: c["resources"]["swc"].update(endpoint="https://x/openai/v1"),
            "resources.swc.endpoint: 'https://x/openai/v1' must be scheme://host",
        ),
        (
            lambda c: c["tenants"]["team-a"]["keys"].append({"id": "a1", "sha256": "b" * 64}),
            "tenants.team-a.keys[1].id: duplicate key id 'a1'",
        ),
        (
            lambda c: c["tenants"]["team-a"]["keys"].append({"id": "a2", "sha256": HASH}),
            "tenants.team-a.keys[1].sha256: duplicate key hash",
        ),
        (
            lambda c: c["tenants"]["team-a"]["keys"][0].update(sha256="xyz"),
            "tenants.team-a.keys[0].sha256: must be 64 hex characters",
        ),
        (
            lambda c: c["tenants"]["team-a"]["quotas"].update(requests_per_minute=0),
            "tenants.team-a.quotas.requests_per_minute: Input should be greater than 0",
        ),
        (
            lambda c: c["tenants"]["team-a"].update(regions=["mars"]),
            "tenants.team-a.regions[0]: 'mars' is not an Azure region",
        ),
        (
            lambda c: c["resources"]["swc"].update(auth="api_key"),
            "resources.swc: auth: api_key needs api_key_env",
        ),
        (
            lambda c: c["resources"]["swc"].update(auth="api_key", api_key_env="NOT SET"),
            "resources.swc.api_key_env: 'NOT SET' is not an environment variable name",
        ),
        (
            lambda c: c.update(credential={"type": "client_secret"}),
            "credential: type client_secret needs tenant_id, client_id, client_secret_env",
        ),
        (lambda c: c.update(credential={"type": "magic"}), "credential.type"),
        (lambda c: c.update(state={"backend": "redis"}), "state: backend: redis needs url_env"),
        (lambda c: c.pop("models"), "models: Field required"),
    ],
)
def test_bad_config_names_the_field(mutate: Any, expected: str) -> None:
    assert expected in _bad(mutate)


def test_secrets_come_from_the_environment() -> None:
    def api_key(c: dict[str, Any]) -> None:
        c["resources"]["swc"].update(auth="api_key", api_key_env="AOAI_SWC_KEY")

    msg = _bad(api_key)
    assert "resources.swc.api_key_env: environment variable AOAI_SWC_KEY is not set" in msg
    cfg = copy.deepcopy(GOOD)
    api_key(cfg)
    loaded = parse_config(cfg, {"AOAI_SWC_KEY": "s3cret-value"})
    assert loaded.resource_keys["swc"].value == "s3cret-value"
    assert "s3cret-value" not in repr(loaded)


def test_config_is_frozen() -> None:
    loaded = parse_config(GOOD, {})
    with pytest.raises(Exception, match="frozen"):
        loaded.config.tenants["team-a"].models = ("*",)  # type: ignore[misc]


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("models: {}\ntenants: {}\nmodels: {}\n", "models", (3, 1)),
        (
            "tenants:\n  team-a:\n    models: [a]\n  team-b:\n    models: [b]\n"
            "  team-a:\n    models: [c]\n",
            "team-a",
            (6, 2),
        ),
        ("tenants:\n  team-a:\n    models: [a]\n    models: [b]\n", "models", (4, 3)),
    ],
    ids=["top-level", "under-tenants", "inside-a-tenant"],
)
def test_duplicate_keys_are_refused_with_their_lines(
    tmp_path: Path, text: str, key: str, lines: tuple[int, int]
) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"duplicate key '{key}' at line {lines[0]} (first at line {lines[1]})" in message
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "duplicate key" in out.stderr and "ok" not in out.stdout


def test_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "config" / "example.yaml"
    loaded = load_config(example, {"AOAI_FR_KEY": "x", "REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert loaded.config.tenants


def test_misspelt_keys_get_a_suggestion_and_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(
        "resources:\n"
        "  swc: {endpoint: 'https://swc.example.com', region: swedencentral}\n"
        "models:\n"
        "  gpt-4.1:\n"
        "    - {resource: swc, deployment: d}\n"
        "tenants:\n"
        "  team-a:\n"
        "    modles: [gpt-4.1]\n"
        "    quotas: {tokens_per_minut: 5, requests_per_minute: 0}\n"
        "stat: {backend: memory}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "tenants.team-a.modles: unknown key (did you mean 'models'?) (line 8)" in message
    assert "tokens_per_minut: unknown key (did you mean 'tokens_per_minute'?) (line 9)" in message
    assert "requests_per_minute: Input should be greater than 0 (line 9)" in message
    assert "stat: unknown key (did you mean 'state'?) (line 10)" in message
