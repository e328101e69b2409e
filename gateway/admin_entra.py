"""Microsoft Entra access tokens as admin credentials (``admin.entra``).

A token is checked as Entra's resource servers check them: RS256 only, signed by a key
of the directory's JWKS (found through its OpenID configuration, both cached), with the
configured audience, an issuer of that directory (v2.0 or v1 form) and an expiry. Its
``roles`` claim (app roles) maps to the tenants the caller manages; a valid token with
no mapped role is 403. The actor in audit records is ``entra:<oid or sub>``.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import jwt

from .config import EntraAdminConfig
from .errors import Forbidden, ServiceUnavailable, Unauthenticated

METADATA_SECONDS = 3600.0


def looks_like_jwt(value: str) -> bool:
    """A compact JWS (three base64url parts, a JSON header): not a gateway key."""
    return value.startswith("eyJ") and value.count(".") == 2


class EntraVerifier:
    """Verifies admin tokens of one directory; its metadata and keys are cached."""

    def __init__(self, cfg: EntraAdminConfig) -> None:
        self.cfg = cfg
        self._jwks: jwt.PyJWKClient | None = None
        self._issuers: tuple[str, ...] = ()
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def _metadata(self) -> tuple[jwt.PyJWKClient, tuple[str, ...]]:
        async with self._lock:
            if self._jwks is None or time.monotonic() - self._fetched > METADATA_SECONDS:
                url = (
                    f"{self.cfg.authority}/{self.cfg.tenant_id}/v2.0/"
                    ".well-known/openid-configuration"
                )
                try:
                    meta = await asyncio.to_thread(_get_json, url)
                    jwks_uri, issuer = meta["jwks_uri"], meta["issuer"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ServiceUnavailable(
                        "Entra admin tokens cannot be checked now (the directory's OpenID "
                        "configuration is unreachable); retry shortly.",
                        code="entra_unavailable",
                    ) from exc
                self._jwks = jwt.PyJWKClient(jwks_uri, cache_keys=True, lifespan=3600, timeout=5)
                tid = self.cfg.tenant_id
                self._issuers = (
                    issuer.replace("{tenantid}", tid),
                    f"https://sts.windows.net/{tid}/",
                )
                self._fetched = time.monotonic()
            return self._jwks, self._issuers

    async def verify(self, token: str) -> tuple[str, tuple[str, ...]]:
        """(actor, tenants managed) of a valid admin token; 401 or 403 otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("it is not a JWT") from None
        if header.get("alg") != "RS256" or not isinstance(header.get("kid"), str):
            raise _invalid("it is not RS256 with a key id")
        client, issuers = await self._metadata()
        try:
            key = await asyncio.to_thread(client.get_signing_key, header["kid"])
        except jwt.PyJWKClientConnectionError as exc:
            raise ServiceUnavailable(
                "Entra admin tokens cannot be checked now (the directory's keys are "
                "unreachable); retry shortly.",
                code="entra_unavailable",
            ) from exc
        except jwt.PyJWKClientError:
            raise _invalid("its signing key is not the directory's") from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                audience=self.cfg.audience,
                issuer=list(issuers),
                options={"require": ["exp", "iss", "aud"]},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("it has expired") from None
        except jwt.InvalidAudienceError:
            raise _invalid("it is for another audience") from None
        except jwt.InvalidIssuerError:
            raise _invalid("it is from another issuer") from None
        except jwt.PyJWTError:
            raise _invalid("its signature or claims are not valid") from None
        roles = claims.get("roles")
        tenants: set[str] = set()
        for role in roles if isinstance(roles, list) else []:
            if isinstance(role, str):
                tenants.update(self.cfg.roles.get(role, ()))
        subject = claims.get("oid") or claims.get("sub") or "unknown"
        if not tenants:
            raise Forbidden(
                "The Entra token carries no app role that this gateway maps to admin rights.",
                code="no_admin_role",
            )
        return f"entra:{subject}", tuple(sorted(tenants))


def _invalid(why: str) -> Unauthenticated:
    return Unauthenticated(f"The Entra admin token is refused: {why}.", code="invalid_admin_token")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())
