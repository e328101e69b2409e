"""Keys: generation, storage as hashes, lookup, and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from gateway.config import parse_config
from gateway.errors import Unauthenticated
from gateway.keys import KeyRing, hash_key, new_key, presented_key


def test_new_keys_are_long_and_unique() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    for k in keys:
        assert k.startswith("gk-") and len(k) >= 3 + 43  # 32 bytes, base64url


def h(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]


def test_presented_key_forms() -> None:
    assert presented_key(h(api_key=" k1 ")) == "k1"
    assert presented_key(h(authorization="Bearer k2")) == "k2"
    assert presented_key(h(authorization="bearer k3")) == "k3"
    assert presented_key(h(authorization="Basic abc")) is None
    assert presented_key([]) is None


def test_two_different_keys_are_ambiguous() -> None:
    """Finding 10: a proxy in between may pick either copy, so neither is picked."""
    same = [(b"api-key", b"k1"), (b"authorization", b"Bearer k1"), (b"api-key", b"k1 ")]
    assert presented_key(same) == "k1"
    for pair in (
        [(b"api-key", b"k1"), (b"api-key", b"k2")],
        [(b"api-key", b"k1"), (b"authorization", b"Bearer k2")],
        [(b"authorization", b"Bearer k1"), (b"authorization", b"Bearer k2")],
    ):
        with pytest.raises(Unauthenticated) as info:
            presented_key(pair)
        assert info.value.code == "ambiguous_credentials"
        assert "k1" not in info.value.message and "k2" not in info.value.message


def _ring(expires_at: str | None = None) -> tuple[KeyRing, str]:
    key = new_key()
    entry: dict[str, str] = {"id": "k1", "sha256": hash_key(key)}
    if expires_at:
        entry["expires_at"] = expires_at
    cfg = parse_config(
        {
            "resources": {"r": {"endpoint": "https://r.example.com", "region": "swedencentral"}},
            "models": {},
            "tenants": {"t": {"keys": [entry]}},
        },
        {},
    )
    return KeyRing(cfg.config), key


def test_lookup_by_hash() -> None:
    ring, key = _ring()
    assert ring.authenticate(h(api_key=key)) == ("t", "k1")
    with pytest.raises(Unauthenticated) as info:
        ring.authenticate(h(api_key=key + "x"))
    assert key not in info.value.message


def test_expired_key() -> None:
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    ring, key = _ring(soon)
    assert ring.authenticate(h(api_key=key)).tenant == "t"
    with pytest.raises(Unauthenticated) as info:
        ring.authenticate(h(api_key=key), now=datetime.now(UTC) + timedelta(hours=2))
    assert info.value.code == "expired_api_key" and key not in info.value.message


def test_keys_new_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "new", "team-a", "--id", "team-a-ci"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = re.search(r"^key: (gk-\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    line = re.search(r'- \{id: team-a-ci, sha256: "([0-9a-f]{64})"\}', out)
    assert line and line.group(1) == hash_key(key)
    assert out.count(key) == 1  # printed once


def test_keys_new_admin_and_which(tmp_path: object) -> None:
    """An admin key's how-to names admin.keys (not tenants.admin.keys), and the entry it
    prints is accepted there; `keys which` names a config key's id and tenant."""
    import yaml

    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "new", "--admin", "--admin-of", "t"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "admin.keys" in out and "tenants.admin" not in out
    key = re.search(r"^key: (gk-\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    entry = yaml.safe_load(out.splitlines()[-1])[0]
    assert entry["sha256"] == hash_key(key) and entry["tenants"] == ["t"]
    tenant_key = new_key()
    cfg = {
        "resources": {"r": {"endpoint": "https://r.example.com", "region": "swedencentral"}},
        "models": {},
        "tenants": {"t": {"keys": [{"id": "k1", "sha256": hash_key(tenant_key)}]}},
        "admin": {"keys": [entry]},
    }
    path = f"{tmp_path}/c.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    which = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "which", tenant_key, "--config", path],
        capture_output=True,
        text=True,
    )
    assert which.returncode == 0 and which.stdout == "id: k1\ntenant: t\n"
    other = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "which", new_key(), "--config", path],
        capture_output=True,
        text=True,
    )
    assert other.returncode == 1 and "not a key of this config" in other.stdout
