"""Failover over the targets: credential, send, breaker verdict, the relay to answer with.

The targets come in order (best priority first, weighted within it); a target whose
breaker is open is skipped, and a connect error, 429 or 5xx before any byte reached the
client moves on to the next. Azure's stale reads of an object it has just made (a 404
on the object's own resource) are retried on the same target.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp

from .answers import Answer
from .breaker import OPEN, capacity_429, retry_after_seconds
from .errors import GatewayError, RateLimited, ServiceUnavailable
from .exchange import Exchange
from .headers import gateway_headers
from .objects import Keeper
from .outbound import Outbound, Query
from .relay import JsonRelay, RawRelay, StreamRelay
from .routes import Match
from .runtime import Gateway, Snapshot
from .upstream import RETRYABLE_STATUS, UpstreamError, UpstreamResponse
from .validate import parse_upstream

log = logging.getLogger("gateway.forward")

# Where Azure says an object it holds is not there (yet): a stale read to retry.
_STALE_CODES = frozenset({"previous_response_not_found", "not_found", "404"})


class Forwarder:
    """Sends one exchange's outbound requests until a target answers."""

    def __init__(self, gw: Gateway, snap: Snapshot, ex: Exchange, method: str) -> None:
        self.gw = gw
        self.snap = snap
        self.ex = ex
        self.method = method

    async def forward(
        self,
        attempts: list[Outbound],
        client_headers: list[tuple[str, str]],
        keeper: Keeper,
        named_objects: bool,
        listing: tuple[Match, Query] | None = None,
    ) -> ASGIApp:
        gw, ex = self.gw, self.ex
        breakers = gw.breakers
        candidates = [
            a for a in attempts if not a.target.deployment or breakers.state(a.target.key) != OPEN
        ]
        best = min(a.target.priority for a in attempts)
        upstream_cfg = self.snap.loaded.config.upstream
        stale_left = upstream_cfg.stale_read_retries if named_objects else 0
        n = 0
        while n < len(candidates):
            attempt = candidates[n]
            target = attempt.target
            guarded = bool(target.deployment)  # requests pinned to a resource have no choice
            if guarded and not breakers.acquire(target.key):
                n += 1
                continue  # another request is probing it
            last = n == len(candidates) - 1
            ex.attempts += 1
            try:
                auth = await gw.auth_header(self.snap, target.resource)
            except BaseException:
                if guarded:
                    breakers.release(target.key)
                raise
            headers = gateway_headers(client_headers, ex.request_id, auth, ex.traceparent_out)
            headers += attempt.headers
            ex.upstream_started = time.perf_counter()
            try:
                resp = await gw.http.send(
                    self.method,
                    target.endpoint + attempt.path,
                    headers,
                    attempt.body,
                    target.resource,
                )
            except UpstreamError as exc:
                if guarded:
                    breakers.failure(target.key, None, None)
                for obs in gw.observers:
                    obs.upstream_failed(ex, target, None)
                if not last and exc.connect:
                    log.warning(
                        "upstream connect failed; trying next target",
                        extra={"request_id": ex.request_id, "resource": target.resource},
                    )
                    n += 1
                    continue
                ex.target = target
                raise exc.error from exc
            except BaseException:  # cancelled: no verdict, so a probe must not stay taken
                if guarded:
                    breakers.release(target.key)
                raise
            if guarded:
                try:
                    if resp.status >= 400:
                        capacity = resp.status == 429 and capacity_429(await resp.read())
                        retry_after = retry_after_seconds(resp.headers)
                        breakers.failure(target.key, resp.status, retry_after, capacity)
                    else:
                        breakers.success(target.key)
                except BaseException:
                    breakers.release(target.key)
                    resp.close()
                    raise
            if (
                stale_left
                and resp.status in (400, 404)
                and target.resource == ex.pinned
                and await _stale_read(resp)
            ):
                # Azure has not caught up with an object it just made on this resource.
                stale_left -= 1
                resp.close()
                for obs in gw.observers:
                    obs.stale_read(ex, target)
                tries = upstream_cfg.stale_read_retries - stale_left
                await asyncio.sleep(upstream_cfg.stale_read_backoff_seconds * tries)
                continue  # the same target again
            if resp.status >= 400:
                for obs in gw.observers:
                    obs.upstream_failed(ex, target, resp.status)
            if not last and resp.status in RETRYABLE_STATUS:
                resp.close()
                log.warning(
                    "upstream refused; trying next target",
                    extra={
                        "request_id": ex.request_id,
                        "resource": target.resource,
                        "status": resp.status,
                    },
                )
                n += 1
                continue
            if listing is not None:
                keeper.next_page = self._pager(attempt, headers, *listing)
            ex.target = target
            ex.spillover = guarded and target.priority > best
            ex.upstream_status = resp.status
            ex.upstream_request_id = resp.headers.get("x-request-id") or resp.headers.get(
                "apim-request-id"
            )
            ctype = resp.headers.get("content-type", "")
            answer = Answer(gw, ex, keeper)  # the response hook hears what the relay reads
            if ctype.startswith("text/event-stream"):
                return StreamRelay(resp, ex, gw, answer)
            if "json" in ctype or resp.status >= 400:
                return JsonRelay(resp, ex, gw, answer)
            return RawRelay(resp, ex, gw, answer)
        raise self._all_open(attempts)

    def _pager(
        self, attempt: Outbound, headers: list[tuple[str, str]], match: Match, query: Query
    ) -> Callable[[str], Awaitable[Any]]:
        """Reads the next page of a list from the same target, with ``after`` = a cursor."""
        target, ex = attempt.target, self.ex
        base = target.endpoint + match.upstream_path()

        async def next_page(cursor: str) -> Any:
            url = base + query.encoded({"after": cursor})
            resp = await self.gw.http.send("GET", url, headers, None, target.resource)
            try:
                raw = await resp.read()
            finally:
                resp.close()
            if resp.status >= 300:
                log.warning(
                    "list walk stopped: upstream refused a page",
                    extra={"request_id": ex.request_id, "status": resp.status},
                )
                return None
            return parse_upstream(raw)

        return next_page

    def _all_open(self, attempts: list[Outbound]) -> GatewayError:
        """Every target is skipped by its breaker: 429 if all were throttled, else 503."""
        until, throttled = self.gw.breakers.reopens_at(a.target.key for a in attempts)
        wait = max(0.0, until - time.time())
        seconds = max(1, math.ceil(wait))
        headers = {"retry-after": str(seconds), "retry-after-ms": str(int(wait * 1000))}
        model = self.ex.model or "this model"
        if throttled:
            return RateLimited(
                f"Every deployment serving '{model}' is throttled by Azure; retry after "
                f"{seconds} s.",
                code="all_targets_throttled",
                headers=headers,
            )
        return ServiceUnavailable(
            f"Every deployment serving '{model}' is failing and is skipped for now; retry "
            f"after {seconds} s.",
            code="no_healthy_target",
            headers=headers,
        )


async def _stale_read(resp: UpstreamResponse) -> bool:
    """Whether an error answer says an object is not there (Azure's stale read)."""
    body = parse_upstream(await resp.read())
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    message = error.get("message")
    if isinstance(code, str) and code in _STALE_CODES:
        return True
    return isinstance(message, str) and "not found" in message.lower()
