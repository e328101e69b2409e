"""Microsoft Entra access tokens as admin credentials, against a local OpenID
configuration and JWKS endpoint serving a test key: good tokens (a gateway admin role,
a tenant admin role), and expired, wrong audience, wrong issuer, unknown key, no role,
unsigned and HMAC tokens refused."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import Server, Sim, Tenants, base_config, gateway, serving
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

TID = "11111111-2222-3333-4444-555555555555"
AUD = "api://azure-responses-gateway"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _directory(hits: list[str]) -> Starlette:
    async def openid(request: Request) -> JSONResponse:
        hits.append("openid")
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {"issuer": f"{base}/{TID}/v2.0", "jwks_uri": f"{base}/{TID}/discovery/v2.0/keys"}
        )

    async def keys(request: Request) -> JSONResponse:
        hits.append("keys")
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
        return JSONResponse({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]})

    return Starlette(
        routes=[
            Route(f"/{TID}/v2.0/.well-known/openid-configuration", openid),
            Route(f"/{TID}/discovery/v2.0/keys", keys),
        ]
    )


@pytest.fixture
def entra(
    identity: Sim, tenants: Tenants, tmp_path: Path
) -> Iterator[tuple[Server, str, list[str]]]:
    hits: list[str] = []
    with serving(_directory(hits)) as directory:
        cfg = base_config({"swc": identity}, tenants)
        cfg["admin"] = {
            "entra": {
                "tenant_id": TID,
                "audience": AUD,
                "authority": directory.url,
                "roles": {"Gateway.Admin": ["*"], "TeamB.Admin": ["team-b"]},
            }
        }
        cfg["audit"] = {"path": str(tmp_path / "audit.jsonl")}
        with gateway(cfg) as gw:
            yield gw, directory.url, hits


def _token(issuer: str, **over: Any) -> str:
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": AUD,
        "exp": int(time.time()) + 600,
        "iat": int(time.time()),
        "oid": "oid-of-jane",
        "roles": ["Gateway.Admin"],
    }
    key, kid, alg = over.pop("_key", KEY), over.pop("_kid", "k1"), over.pop("_alg", "RS256")
    claims.update(over)
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def _create(gw: Server, token: str, tenant: str = "team-a") -> httpx.Response:
    return httpx.post(
        gw.url + "/admin/keys",
        headers={"authorization": f"Bearer {token}"},
        json={"tenant": tenant, "name": "by-entra"},
    )


def test_entra_admin_tokens(entra: tuple[Server, str, list[str]], tmp_path: Path) -> None:
    gw, directory, hits = entra
    issuer = f"{directory}/{TID}/v2.0"
    ok = _create(gw, _token(issuer))
    assert ok.status_code == 201, ok.text
    # A tenant admin role: its tenant only.
    lead = _token(issuer, roles=["TeamB.Admin"])
    assert _create(gw, lead, "team-b").status_code == 201
    assert _create(gw, lead, "team-a").status_code == 403
    # The v1 issuer of the same directory is accepted too.
    assert _create(gw, _token(f"https://sts.windows.net/{TID}/")).status_code == 201
    refused = {
        "expired": _token(issuer, exp=int(time.time()) - 120),
        "audience": _token(issuer, aud="api://another"),
        "issuer": _token(issuer.replace(TID, "99999999-2222-3333-4444-555555555555")),
        "unknown kid": _token(issuer, _key=OTHER, _kid="k2"),
        "wrong key, known kid": _token(issuer, _key=OTHER),
        "hmac": _token(issuer, _key="secret" * 8, _alg="HS256"),
        "garbage": "eyJhbGciOiJSUzI1NiJ9.bm9wZQ.bm9wZQ",
    }
    for why, token in refused.items():
        r = _create(gw, token)
        assert r.status_code == 401, (why, r.text)
        assert r.json()["error"]["code"] == "invalid_admin_token", why
        assert token not in r.text
    unsigned = jwt.encode({"iss": issuer, "aud": AUD, "roles": ["Gateway.Admin"]}, None, "none")
    assert _create(gw, unsigned).status_code == 401
    no_role = _create(gw, _token(issuer, roles=["Reader"]))
    assert no_role.status_code == 403 and no_role.json()["error"]["code"] == "no_admin_role"
    # Metadata and keys are cached: fetched once, plus once more for the unknown kid.
    assert hits.count("openid") == 1 and hits.count("keys") <= 3
    # The actor in the audit chain is the token's subject, never the token.
    audit = (tmp_path / "audit.jsonl").read_text()
    assert '"actor": "entra:oid-of-jane"' in audit or '"actor":"entra:oid-of-jane"' in audit
    assert "eyJ" not in audit
