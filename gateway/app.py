"""Starlette wiring: routes, lifespan-owned clients, health and metrics endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .admin import AdminApi
from .admission import QuotaGate
from .apikeys import ApiKeys
from .audit import Auditor, Redactor
from .audit_sinks import FileSink, RedisStreamSink, Sink, StdoutSink
from .breaker import Breakers, BreakerStore
from .config import LoadedConfig
from .credentials import TokenProvider, build_credential
from .errors import GatewayError, MethodNotAllowed
from .exchange import Observer
from .guardrails import Guard
from .headers import safe_request_id
from .logs import AccessLog
from .metrics import Metrics
from .proxy import Proxy
from .reload import Reloader
from .routes import ENDPOINTS, RouteTable, scope_segments
from .runtime import Gateway
from .server import on_signal
from .sockets import Sockets, quiet_handshake_lines
from .state import StateBackend
from .state.guard import GuardedState
from .state.keystore import KeyStore, MemoryKeyStore
from .state.memory import MemoryState
from .upstream import new_client

log = logging.getLogger("gateway")
MEMORY_WARNING = (
    "state.backend is memory: a restart forgets which tenant owns each id, the keys made"
    " at runtime and the day's and month's spend; use sqlite (one replica) or redis"
)


def _error(exc: GatewayError, request: Request) -> Response:
    rid = safe_request_id(request.headers.get("x-request-id")) or uuid.uuid4().hex
    headers = {**exc.headers, "x-request-id": rid}
    return Response(exc.body(), exc.status, media_type="application/json", headers=headers)


class Dispatch:
    """API paths go straight to their operation through the route table; the gateway's
    own endpoints (health, readiness, metrics, admin) and lifespan go to Starlette; every
    other path to the ``unknown`` operation (a logged, counted 404).

    Fixed paths are a dict lookup; the lifecycle owner makes Starlette's router and
    middleware redundant for API routes.
    """

    def __init__(
        self,
        app: Starlette,
        table: RouteTable,
        operations: dict[str, Any],
        unknown: Any,
        local: frozenset[str],
        sockets: Any,
    ) -> None:
        self.app = app
        self.table = table
        self.operations = operations
        self.unknown = unknown
        self.sockets = sockets
        self.local = local
        self.state = app.state
        self.router = app.router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            match = self.table.match(scope["method"], scope_segments(scope))
            if match is not None:
                scope["route"] = match
                await self.operations[match.endpoint.operation](scope, receive, send)
                return
            if path not in self.local and not path.startswith("/admin/"):
                await self.unknown(scope, receive, send)
                return
        elif scope["type"] == "websocket":
            await self.sockets(scope, receive, send)
            return
        await self.app(scope, receive, send)


LAG_INTERVAL = 0.25


async def _measure_loop_lag(gateway: Gateway, metrics: Metrics) -> None:
    """Every ``LAG_INTERVAL``: how late the loop woke this timer (``gateway.loop_lag``)."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(LAG_INTERVAL)
        gateway.loop_lag = max(0.0, loop.time() - before - LAG_INTERVAL)
        metrics.loop_lag.set(gateway.loop_lag)


def _dump_tasks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every pending task with its stack to stderr: what a
    process that does not stop is waiting on (only where the loop owns signals)."""
    import signal
    import sys

    def dump() -> None:
        for task in asyncio.all_tasks():
            print(f"task: {task!r}", file=sys.stderr)
            task.print_stack(limit=12, file=sys.stderr)
        sys.stderr.flush()

    on_signal(signal.SIGUSR1, dump)


def build_state(
    loaded: LoadedConfig, metrics: Metrics | None = None
) -> tuple[StateBackend, BreakerStore | None, KeyStore]:
    """The state backend the config selects (a shared one behind its breaker), where
    target breakers are shared (None: per process), and where runtime keys live."""
    st = loaded.config.state
    if st.backend == "redis":
        from .state.redis import RedisState

        assert loaded.redis_url is not None
        redis = RedisState(loaded.redis_url.value, timeout=st.timeout_seconds, mode=st.mode)
        guarded = GuardedState(
            redis,
            breaker_seconds=st.breaker_seconds,
            queue_size=st.retry_queue_size,
            on_event=metrics.state_event if metrics else None,
            shard_of=redis.shard,
        )
        if metrics is not None:
            metrics.watch_state(guarded)
        return guarded, redis, redis.key_store()
    if st.backend == "sqlite":
        from .state.sqlite import SqliteState

        durable = SqliteState(st.path, st.memory_max_objects)
        return durable, None, durable.key_store()
    return MemoryState(st.memory_max_objects), None, MemoryKeyStore()


def build_auditor(loaded: LoadedConfig, metrics: Metrics) -> Auditor:
    """The MCP auditor with the sinks the config names."""
    cfg = loaded.config.audit
    sinks: list[Sink] = []
    for sink, url in zip(cfg.all_sinks(), loaded.audit_urls, strict=True):
        if sink.type == "file":
            assert sink.path is not None
            sinks.append(FileSink(sink.path, sink.max_bytes, sink.backups, sink.fsync))
        elif sink.type == "stdout":
            sinks.append(StdoutSink())
        else:
            assert url is not None
            sinks.append(
                RedisStreamSink(
                    url.value,
                    sink.stream,
                    sink.maxlen,
                    loaded.config.state.timeout_seconds,
                    sink.mode,
                )
            )
    return Auditor(
        sinks,
        Redactor((*cfg.secret_keys, *cfg.extra_secret_keys), cfg.max_output_chars),
        on_failure=cfg.on_failure,
        on_record=metrics.audit_record,
        on_write_failure=metrics.audit_failed,
    )


def create_app(
    loaded: LoadedConfig, *, credential: Any = None, config_path: str | None = None
) -> Dispatch:
    """The gateway ASGI app for a loaded config (``credential`` overrides azure-identity's).

    With ``config_path``, the file is watched and reloaded (SIGHUP or on change).
    """
    cfg = loaded.config
    metrics = Metrics(lambda: gateway.snap.loaded.config)
    observers: list[Observer] = [metrics, AccessLog()]
    tracing = None
    if cfg.tracing.otlp_endpoint:
        try:
            from .tracing import Tracing

            tracing = Tracing(cfg.tracing)
        except ImportError as exc:
            raise RuntimeError(
                "tracing.otlp_endpoint is set but OpenTelemetry is not installed: "
                "pip install 'azure-responses-gateway[tracing]'"
            ) from exc
        observers.insert(0, tracing)  # first: the span starts before the others look
    needs_entra = any(
        r.auth == "entra" for r in (*cfg.resources.values(), *cfg.content_safety.values())
    )
    tokens = None
    if needs_entra:
        tokens = TokenProvider(
            credential or build_credential(cfg.credential, loaded.client_secret),
            margin=cfg.credential.refresh_margin_seconds,
            timeout=cfg.credential.timeout_seconds,
            on_fetch=metrics.token_fetched,
        )
    state, shared, key_store = build_state(loaded, metrics)
    breakers = Breakers(cfg.breaker, shared, on_event=metrics.breaker_event)
    auditor = build_auditor(loaded, metrics)
    gate = QuotaGate(
        state,
        on_state_error=cfg.state.on_state_error,
        lease_seconds=cfg.state.lease_seconds,
        retention_seconds=cfg.state.response_retention_days * 86400.0,
        on_error=metrics.state_failed,
        on_budget_warning=metrics.budget_warning,
    )
    gateway = Gateway(
        loaded,
        http=new_client(cfg.upstream),
        state=state,
        tokens=tokens,
        observers=observers,
        gate=gate,
        audit=auditor,
        breakers=breakers,
        keys=ApiKeys(key_store),
    )
    if isinstance(state, GuardedState):  # a late loop is told from a silent Redis by it
        state.watch_loop(lambda: gateway.loop_lag)
    metrics.watch_targets(breakers, [t.key for t in gateway.snap.router.all_targets()])
    metrics.watch_keys(gateway.keys.used)
    gateway.batches.metrics = metrics
    gateway.guard = Guard(lambda: gateway.snap.loaded, tokens, on_verdict=metrics.guardrail)
    proxy = Proxy(gateway)

    reloader = None
    if config_path is not None:
        reloader = Reloader(
            gateway,
            config_path,
            cfg.server.reload_interval_seconds,
            on_result=lambda r: metrics.config_reloads.labels(r).inc(),
        )
    scopes = sorted({r.scope for r in cfg.resources.values() if r.auth == "entra"})
    last_check: list[Any] = [0.0, "no token fetched yet"]

    async def credential_ready() -> str | None:
        """None if a token can be had; tried at most every 10 s, never per probe."""
        if tokens is None or tokens.has_usable_token():
            return None
        now = time.monotonic()
        if now - float(last_check[0]) > 10:
            last_check[0] = now
            try:
                await tokens.token(scopes[0])
                return None
            except GatewayError as exc:
                last_check[1] = exc.message
        return str(last_check[1])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        watcher = asyncio.create_task(reloader.run()) if reloader else None
        connect = getattr(gateway.state, "connect", None)
        if connect is not None:
            await connect()
        if gateway.snap.loaded.config.state.backend == "memory":
            log.warning(MEMORY_WARNING)
        key_refresher = asyncio.create_task(gateway.keys.run())
        lag_meter = asyncio.create_task(_measure_loop_lag(gateway, metrics))
        _dump_tasks_on_sigusr1()
        gateway.batches.start()
        refresher = None
        if shared is not None:
            targets = lambda: [t.key for t in gateway.snap.router.all_targets()]  # noqa: E731
            refresher = asyncio.create_task(breakers.refresh_forever(targets))
        try:
            yield {"gateway": gateway}
        finally:
            for task in (watcher, refresher, key_refresher, lag_meter):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await gateway.batches.stop()
            await breakers.aclose()
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)
            await gateway.http.aclose()
            if gateway.guard is not None:
                await gateway.guard.aclose()
            await gateway.state.aclose()
            await gateway.audit.aclose()
            if gateway.tokens is not None:
                gateway.tokens.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        """Ready unless draining, without a credential, or (with ``deny``) without state.

        With ``on_state_error: allow`` the replica serves through a state outage, so it
        stays ready and reports the outage in ``degraded`` (and in metrics).
        """
        problems: list[str] = []
        degraded: list[str] = []
        if gateway.draining:
            problems.append("draining")
        try:
            await gateway.state.ping()
        except GatewayError as exc:
            deny = gateway.snap.loaded.config.state.on_state_error == "deny"
            (problems if deny else degraded).append(f"state: {exc.message}")
        cred = await credential_ready()
        if cred:
            problems.append(f"credential: {cred}")
        status = 503 if problems else 200
        body = {"ready": not problems, "problems": problems, "degraded": degraded}
        if gateway.snap.loaded.config.state.backend == "memory":
            body["warnings"] = [MEMORY_WARNING]
        return JSONResponse(body, status)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own refusals on the gateway's endpoints (a wrong method, mostly)."""
        assert isinstance(exc, HTTPException)
        message = f"{exc.detail} ({request.method} {request.url.path})."
        if exc.status_code == 405:
            return _error(MethodNotAllowed(message), request)
        err = GatewayError(message)
        err.code, err.status, err.type = "http_error", exc.status_code, "invalid_request_error"
        return _error(err, request)

    table = RouteTable()
    operations = {ep.operation: proxy.endpoint(ep.operation) for ep in ENDPOINTS}
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *AdminApi(gateway).routes(),
        *([] if cfg.metrics.port else [Route("/metrics", metrics_endpoint, methods=["GET"])]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    # A redirect would build its Location from the client's Host header.
    app.router.redirect_slashes = False
    app.state.gateway = gateway
    app.state.metrics = metrics
    app.state.reloader = reloader
    local = frozenset(r.path for r in routes)
    quiet_handshake_lines()
    return Dispatch(app, table, operations, proxy.unknown(table), local, Sockets(gateway))
