"""Redis state for several replicas: one Lua script per operation, keys hash-tagged per tenant.

Every key a tenant's quota touches is ``gw:{TENANT}:…`` so each script call's keys share
one Redis Cluster slot (``admit_call`` and ``settle_call`` build them; a test holds that
every call stays in one slot); response bindings are ``gw:resp:{ID}``, one key each.
Every key has a TTL. With ``mode: cluster`` the client is redis-py's ``RedisCluster``,
which follows ``MOVED``/``ASK`` and loads a script on a node that answers ``NOSCRIPT``.
Redis failures become ``StateError``; short timeouts keep a dead Redis (or shard) from
holding requests, and redis-py reconnects on the next command.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from ..errors import StateError, StateTimeout
from ..quotas import REASONS, Admission, QuotaScope, Windows
from . import Binding, LedgerEntry, Settled, ledger_increments
from .keystore import RedisKeyStore

T = TypeVar("T")
_REASONS = (None, *REASONS)


def _script(name: str) -> str:
    return files("gateway.state").joinpath(name).read_text()


def _base(s: QuotaScope) -> str:
    return f"gw:{{{s.tenant}}}:{s.model}"


def binding_key(object_id: str) -> str:
    """The key of one object binding."""
    return f"gw:resp:{{{object_id}}}"


def tenant_key(tenant: str) -> str:
    """A key in the tenant's slot (what its quota scripts touch)."""
    return f"gw:{{{tenant}}}:"


# Batches the watcher polls: one set, in the {batches} slot with the watcher's lease
# (so the guard finds the node of both by it).
OPEN_BATCHES = "gw:{batches}:open"
_LEASE = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# How long an admission's answer is kept under its lease id: a retry of the same admit
# (its answer was read late, see guard.py) gets that answer instead of a second count.
ADMIT_MARKER_SECONDS = 15.0


def admit_call(
    scopes: list[QuotaScope], lease: str, lease_ttl: float, w: Windows
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of one ``admit.lua`` call."""
    keys: list[str] = []
    args: list[Any] = [w.now, lease, lease_ttl, w.day_left, w.month_left, len(scopes)]
    args.append(int(ADMIT_MARKER_SECONDS * 1000))
    for s in scopes:
        b = _base(s)
        keys += [f"{b}:rq", f"{b}:tk", f"{b}:d:{w.day}", f"{b}:m:{w.month}", f"{b}:lease"]
        keys += [f"{b}:cd:{w.day}", f"{b}:cm:{w.month}"]
        args += [s.rpm, s.tpm, s.tpd, s.tpmonth, s.concurrency, s.cost_day, s.cost_month]
    keys.append(f"{tenant_key(scopes[0].tenant)}adm:{lease}" if scopes else "gw:adm:-")
    return keys, args


def settle_tenant(scopes: list[QuotaScope], ledger: LedgerEntry | None) -> str:
    """The tenant a settle belongs to (its keys, and so its shard, are that tenant's)."""
    return scopes[0].tenant if scopes else ledger.tenant if ledger else ""


def settle_call(
    scopes: list[QuotaScope],
    lease: str | None,
    tokens: int,
    w: Windows,
    once: str | None,
    ttl: float,
    cost: int = 0,
    ledger: LedgerEntry | None = None,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of one ``settle.lua`` call."""
    tenant = settle_tenant(scopes, ledger)
    keys = [f"{tenant_key(tenant)}charged:{once or '-'}", ledger_key(tenant, w.day)]
    args: list[Any] = [
        w.now,
        tokens,
        "1" if once else "0",
        int(ttl),
        w.day_left,
        w.month_left,
        len(scopes),
        lease or "",
        cost,
    ]
    for s in scopes:
        b = _base(s)
        keys += [f"{b}:tk", f"{b}:d:{w.day}", f"{b}:m:{w.month}", f"{b}:lease"]
        keys += [f"{b}:cd:{w.day}", f"{b}:cm:{w.month}"]
        args.append(s.tpm)
    if ledger is None:
        args.append("0")
    else:
        args += ["1", int(ledger.ttl), f"{ledger.model}|{ledger.resource}"]
        for field, value in ledger_increments(ledger).items():
            args += [field, value]
    return keys, args


def ledger_key(tenant: str, day: str) -> str:
    """The usage ledger row of a tenant for one UTC day (a hash: model|field -> count)."""
    return f"{tenant_key(tenant)}u:{day}"


class RedisState:
    """The state backend on Redis: one server (standalone, Azure Cache) or a cluster."""

    def __init__(self, url: str, timeout: float = 0.2, mode: str = "single") -> None:
        self.mode = mode
        self.url = url
        self.timeout = timeout
        self._patient: RedisState | None = None
        self._client: Any
        if mode == "cluster":
            self._client = RedisCluster.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                require_full_coverage=False,
                max_connections=10_000,  # per node; the single-server pool is unbounded too
                # A dead shard costs one timeout, not ten; the breaker does the rest.
                # MOVED/ASK redirections are followed apart from this.
                retry=Retry(NoBackoff(), 0),
            )
        else:
            self._client = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry_on_timeout=False,
                health_check_interval=30,
            )
        self._admit = self._client.register_script(_script("admit.lua"))
        self._settle = self._client.register_script(_script("settle.lua"))
        self._lease = self._client.register_script(_LEASE)

    def patient(self) -> RedisState:
        """The same store on connections of its own with a timeout ten times as long
        (at least 2 s): where a call that timed out is tried again when the event loop,
        not Redis, was late (``guard.py``)."""
        if self._patient is None:
            self._patient = RedisState(self.url, max(2.0, self.timeout * 10), self.mode)
        return self._patient

    def shard(self, key: str) -> str:
        """The node that serves ``key`` (one name for a single server): the breaker's unit."""
        if self.mode != "cluster":
            return "redis"
        try:
            node = self._client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        except Exception:  # topology not known yet (before the first command)
            return "cluster"
        return str(node.name)

    async def connect(self) -> None:
        """Learn the cluster's topology before the first request (no-op for one server).

        Left to the first commands, concurrent requests race redis-py's initialisation
        (the patient twin's too: its first use is a burst of retries).
        """
        if self.mode == "cluster":
            await self._call("connect", self._client.initialize)
            patient = self.patient()
            await patient._call("connect", patient._client.initialize)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except RedisTimeout as exc:
            raise StateTimeout(
                f"The gateway's state store did not answer in time ({what})."
            ) from exc
        except (RedisError, OSError, RuntimeError) as exc:
            # RuntimeError: the cluster client wrote on a connection its own topology
            # refresh had just closed.
            raise StateError(f"The gateway's state store is unavailable ({what}).") from exc

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        value = "\x00".join(binding)
        await self._call(
            "bind", lambda: self._client.set(f"gw:resp:{{{response_id}}}", value, ex=int(ttl))
        )

    async def get_binding(self, response_id: str) -> Binding | None:
        raw = await self._call("lookup", lambda: self._client.get(binding_key(response_id)))
        if raw is None:
            return None
        text = raw if isinstance(raw, str) else raw.decode()
        return Binding(*text.split("\x00"))

    async def delete_binding(self, response_id: str) -> None:
        await self._call("unbind", lambda: self._client.delete(binding_key(response_id)))

    async def admit(
        self, scopes: list[QuotaScope], lease: str, lease_ttl: float, w: Windows
    ) -> Admission:
        keys, args = admit_call(scopes, lease, lease_ttl, w)
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
            int(r[9]),
        )

    async def settle(
        self,
        scopes: list[QuotaScope],
        lease: str | None,
        tokens: int,
        w: Windows,
        once: str | None,
        ttl: float,
        cost: int = 0,
        ledger: LedgerEntry | None = None,
    ) -> Settled:
        if not scopes and ledger is None:
            return Settled(False)
        keys, args = settle_call(scopes, lease, tokens, w, once, ttl, cost, ledger)
        r = await self._call("settle", lambda: self._settle(keys=keys, args=args))
        spent = tuple((int(r[i]), int(r[i + 1])) for i in range(1, len(r) - 1, 2))
        return Settled(bool(int(r[0])), spent)

    # -- shared circuit breakers (gateway/breaker.py) -----------------------------

    @staticmethod
    def breaker_key(target: str) -> str:
        """All breaker keys share the ``{breakers}`` slot, so one MGET reads them all."""
        return f"gw:{{breakers}}:{target}"

    async def publish(self, target: str, until: float, throttled: bool) -> None:
        """Share a trip: the target is open until ``until`` (epoch seconds)."""
        ttl_ms = max(1, int((until - time.time()) * 1000))
        value = f"{until:.3f}|{int(throttled)}"
        await self._call(
            "breaker", lambda: self._client.set(self.breaker_key(target), value, px=ttl_ms)
        )

    async def fetch(self, targets: list[str]) -> dict[str, tuple[float, bool]]:
        """The trips other replicas shared that are still open."""
        if not targets:
            return {}
        keys = [self.breaker_key(t) for t in targets]
        values = await self._call("breaker", lambda: self._client.mget(keys))
        out: dict[str, tuple[float, bool]] = {}
        for target, raw in zip(targets, values, strict=True):
            if raw:
                until, _, throttled = (raw if isinstance(raw, str) else raw.decode()).partition("|")
                out[target] = (float(until), throttled == "1")
        return out

    async def usage(self, tenant: str, day: str) -> dict[tuple[str, str], dict[str, int]]:
        raw = await self._call("usage", lambda: self._client.hgetall(ledger_key(tenant, day)))
        out: dict[tuple[str, str], dict[str, int]] = {}
        for name, value in raw.items():
            text = name if isinstance(name, str) else name.decode()
            model, resource, field = text.rsplit("|", 2)  # resource names have no '|'
            out.setdefault((model, resource), {})[field] = int(value)
        return out

    def key_store(self) -> RedisKeyStore:
        """The store of runtime keys, on this backend's connection."""
        return RedisKeyStore(self._client, self._call)

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)

    async def charged(self, tenant: str, once: str) -> bool:
        key = f"{tenant_key(tenant)}charged:{once}"
        return bool(await self._call("charged", lambda: self._client.exists(key)))

    async def batch_open(self, batch_id: str) -> None:
        await self._call("batches", lambda: self._client.sadd(OPEN_BATCHES, batch_id))

    async def batch_done(self, batch_id: str) -> None:
        await self._call("batches", lambda: self._client.srem(OPEN_BATCHES, batch_id))

    async def open_batches(self) -> list[str]:
        raw = await self._call("batches", lambda: self._client.smembers(OPEN_BATCHES))
        return sorted(m if isinstance(m, str) else m.decode() for m in raw)

    async def lease(self, name: str, holder: str, ttl: float) -> bool:
        """One atomic script: take the lease if free, extend it if ours."""
        key = f"gw:{{batches}}:lease:{name}"
        got = await self._call(
            "lease", lambda: self._lease(keys=[key], args=[holder, int(ttl * 1000)])
        )
        return bool(got)

    async def aclose(self) -> None:
        if self._patient is not None:
            await self._patient.aclose()
        await self._client.aclose()
