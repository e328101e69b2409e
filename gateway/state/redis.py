"""Redis state for several replicas: one Lua script per operation, keys hash-tagged per tenant.

Every key a tenant's quota touches is ``gw:{TENANT}:…`` so a request's keys share one
Redis Cluster slot; response bindings are ``gw:resp:{ID}``. Every key has a TTL.
Redis failures become ``StateError``; short timeouts keep a dead Redis from
holding requests, and redis-py reconnects on the next command.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import StateError
from ..quotas import Admission, QuotaScope, Windows
from . import Binding

T = TypeVar("T")
_REASONS = (
    None,
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "max_concurrent_requests",
)


def _script(name: str) -> str:
    return files("gateway.state").joinpath(name).read_text()


def _base(s: QuotaScope) -> str:
    return f"gw:{{{s.tenant}}}:{s.model}"


class RedisState:
    """The state backend on a Redis server (standalone, Sentinel-fronted or Azure Cache)."""

    def __init__(self, url: str, timeout: float = 0.2) -> None:
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=30,
        )
        self._admit = self._client.register_script(_script("admit.lua"))
        self._settle = self._client.register_script(_script("settle.lua"))

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError) as exc:
            raise StateError(f"The gateway's state store is unavailable ({what}).") from exc

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        value = "\x00".join(binding)
        await self._call(
            "bind", lambda: self._client.set(f"gw:resp:{{{response_id}}}", value, ex=int(ttl))
        )

    async def get_binding(self, response_id: str) -> Binding | None:
        raw = await self._call("lookup", lambda: self._client.get(f"gw:resp:{{{response_id}}}"))
        if raw is None:
            return None
        text = raw if isinstance(raw, str) else raw.decode()
        return Binding(*text.split("\x00"))

    async def delete_binding(self, response_id: str) -> None:
        await self._call("unbind", lambda: self._client.delete(f"gw:resp:{{{response_id}}}"))

    async def admit(
        self, scopes: list[QuotaScope], lease: str, lease_ttl: float, w: Windows
    ) -> Admission:
        keys: list[str] = []
        args: list[Any] = [w.now, lease, lease_ttl, w.day_left, w.month_left, len(scopes)]
        for s in scopes:
            b = _base(s)
            keys += [f"{b}:rq", f"{b}:tk", f"{b}:d:{w.day}", f"{b}:m:{w.month}", f"{b}:lease"]
            args += [s.rpm, s.tpm, s.tpd, s.tpmonth, s.concurrency]
        r = await self._call("admit", lambda: self._admit(keys=keys, args=args))
        return Admission(
            bool(r[0]),
            _REASONS[int(r[1])],
            float(r[2]),
            int(r[3]),
            int(r[4]),
            float(r[5]),
            int(r[6]),
            int(r[7]),
            float(r[8]),
            lease,
        )

    async def settle(
        self,
        scopes: list[QuotaScope],
        lease: str | None,
        tokens: int,
        w: Windows,
        once: str | None,
        ttl: float,
    ) -> bool:
        if not scopes:
            return False
        tenant = scopes[0].tenant
        keys = [f"gw:{{{tenant}}}:charged:{once or '-'}"]
        args: list[Any] = [
            w.now,
            tokens,
            "1" if once else "0",
            int(ttl),
            w.day_left,
            w.month_left,
            len(scopes),
            lease or "",
        ]
        for s in scopes:
            b = _base(s)
            keys += [f"{b}:tk", f"{b}:d:{w.day}", f"{b}:m:{w.month}", f"{b}:lease"]
            args.append(s.tpm)
        r = await self._call("settle", lambda: self._settle(keys=keys, args=args))
        return bool(r)

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)

    async def aclose(self) -> None:
        await self._client.aclose()
