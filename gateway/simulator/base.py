"""The simulator's state, what it records, and the helpers its endpoints share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..body import media, read_form
from ..errors import BadRequest, GatewayError
from .shapes import PNG, Json, _error, _id

IDENTITY_HEADER = "sim-identity-header"


@dataclass
class Recorded:
    """One request as the simulator received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class SimState:
    """Everything the simulator remembers; tests read and steer it."""

    region: str = "swedencentral"
    api_key: str = "sim-api-key"
    delay: float = 0.0
    background_seconds: float = 0.3
    token_expires_in: float = 3600.0
    token_delay: float = 0.0
    fail_queue: list[int] = field(default_factory=list)
    fail_headers: dict[str, str] = field(default_factory=lambda: {"retry-after": "1"})
    fail_message: str = ""  # the injected error's message; default "Simulated upstream error N."
    responses: dict[str, Json] = field(default_factory=dict)
    inputs: dict[str, list[Json]] = field(default_factory=dict)
    events: dict[str, list[Json]] = field(default_factory=dict)
    ready_at: dict[str, float] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    sent_streams: list[bytes] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    on_request: Callable[[Recorded], None] | None = None
    files: dict[str, tuple[Json, bytes]] = field(default_factory=dict)
    conversations: dict[str, tuple[Json, list[Json]]] = field(default_factory=dict)
    vector_stores: dict[str, tuple[Json, dict[str, Json]]] = field(default_factory=dict)
    containers: dict[str, tuple[Json, dict[str, tuple[Json, bytes]]]] = field(default_factory=dict)
    stale_reads: int = 0  # the next N lookups of stored objects answer "not found"
    ws_frames: list[str] = field(default_factory=list)  # text frames the sockets received
    sockets_open: int = 0
    started: list[str] = field(default_factory=list)  # paths, as each request's head arrives
    batches: dict[str, Json] = field(default_factory=dict)
    batch_started: dict[str, float] = field(default_factory=dict)
    batch_seconds: float = 1.0  # validating → in_progress → completed, in about this long
    batch_deployments: frozenset[str] | None = None  # None: every deployment takes batches
    content_delays: int = 0  # the next N file downloads each wait ``content_delay`` first
    content_delay: float = 0.0
    # Realtime: each response streams this many text deltas this far apart; what it did.
    realtime_deltas: int = 3
    realtime_delta_seconds: float = 0.01
    realtime_started: list[str] = field(default_factory=list)  # responses begun by VAD
    realtime_cancelled: list[str] = field(default_factory=list)  # responses cancelled

    # Content Safety (``safety.py``): every answer waits this long; the next calls fail.
    safety_delay: float = 0.0
    safety_fail_queue: list[int] = field(default_factory=list)

    max_stored: int = 2_000

    def forget_oldest(self) -> None:
        """Keep at most ``max_stored`` responses (and requests), like a bounded store."""
        while len(self.responses) > self.max_stored:
            rid = next(iter(self.responses))
            for store in (self.responses, self.inputs, self.events, self.ready_at):
                store.pop(rid, None)
        if len(self.requests) > 2 * self.max_stored:
            del self.requests[: self.max_stored]
        if len(self.sent_streams) > self.max_stored:
            del self.sent_streams[: self.max_stored // 2]

    def stale(self) -> bool:
        """Whether this lookup is one of the next ``stale_reads`` that miss (and count it)."""
        if self.stale_reads > 0:
            self.stale_reads -= 1
            return True
        return False

    def api_requests(self) -> list[Recorded]:
        """Every API request (not the token endpoint's)."""
        return [r for r in self.requests if r.path.startswith("/openai/")]

    def new_container(self, name: str) -> Json:
        """A container with one generated file in it (a plot, as code interpreter makes)."""
        cid = _id("cntr")
        fid = _id("cfile")
        meta = {
            "id": fid,
            "object": "container.file",
            "container_id": cid,
            "path": f"/mnt/data/{fid}.png",
            "bytes": len(PNG),
            "source": "assistant",
        }
        obj = {
            "id": cid,
            "object": "container",
            "name": name,
            "created_at": int(time.time()),
            "status": "running",
        }
        self.containers[cid] = (obj, {fid: (meta, PNG)})
        return obj


class Ctx:
    """What every endpoint module of the simulator uses: the state, the recorder (auth,
    failure injection), Azure's headers, and the answers' shapes."""

    def __init__(self, sim: SimState) -> None:
        self.sim = sim
        # Set by the Responses module: a new response for a create body (HTTP or socket).
        self.produce: Callable[[Json, dict[str, str]], tuple[Json, list[Json]] | Response]
        error = _error
        new_id = _id

        async def record(request: Request) -> tuple[Recorded, Response | None]:
            sim.started.append(request.url.path)
            if len(sim.started) > 2 * sim.max_stored:
                del sim.started[: sim.max_stored]
            rec = Recorded(
                request.method,
                request.url.path,
                request.url.query,
                {k.lower(): v for k, v in request.headers.items()},
                await request.body(),
            )
            sim.requests.append(rec)
            if sim.on_request is not None:
                sim.on_request(rec)
            if (
                request.url.path.startswith("/openai/")
                and not request.url.path.startswith("/openai/v1/")
                and "api-version" not in request.query_params
            ):
                return rec, _error(404, "Resource not found", "404")
            auth = rec.headers.get("authorization", "")
            if not (
                auth.startswith("Bearer sim-token-") or rec.headers.get("api-key") == sim.api_key
            ):
                return rec, _error(401, "Access denied due to invalid credentials.", "401")
            hang = float(rec.headers.get("x-sim-hang", "0"))
            if hang:
                await asyncio.sleep(hang)
            status = int(rec.headers.get("x-sim-status", "0")) or (
                sim.fail_queue.pop(0) if sim.fail_queue else 0
            )
            if status:
                message = sim.fail_message or f"Simulated upstream error {status}."
                resp = _error(status, message, str(status))
                resp.headers.update(sim.fail_headers)
                return rec, resp
            return rec, None

        def headers() -> dict[str, str]:
            return {
                "x-request-id": _id("sim"),
                "apim-request-id": _id("apim"),
                "x-ms-region": sim.region,
                "x-ratelimit-remaining-requests": "4999",
                "x-ratelimit-remaining-tokens": "123456",
            }

        def ok(body: Json, status: int = 200) -> Response:
            return JSONResponse(body, status, headers=headers())

        def listing(
            data: list[Json], request: Request | None = None, limit: int = 10_000
        ) -> Response:
            """A list page: ``after`` (an id) and ``limit`` from the request's query, as Azure."""
            if request is not None:
                after = request.query_params.get("after")
                if after:
                    ids = [d["id"] for d in data]
                    data = data[ids.index(after) + 1 :] if after in ids else []
                limit = int(request.query_params.get("limit", limit))
            page = data[:limit]
            return ok(
                {
                    "object": "list",
                    "data": page,
                    "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None,
                    "has_more": len(data) > limit,
                }
            )

        def missing(kind: str, oid: str) -> Response:
            return error(404, f"No {kind} found with id '{oid}'.", "not_found")

        def handler(fn: Callable[[Request, Recorded], Awaitable[Response]]) -> Callable[..., Any]:
            async def run(request: Request) -> Response:
                rec, err = await record(request)
                if err is not None:
                    return err
                uploading = request.method == "POST" and "/files" in request.url.path
                if not uploading and sim.stale():
                    return error(404, "Item with id 'x' not found.", "not_found")
                try:
                    return await fn(request, rec)
                except GatewayError as exc:  # a form without a boundary, as the gateway says it
                    return error(exc.status, exc.message, exc.code or "invalid_request")
                except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
                    return error(400, f"Invalid request body ({type(exc).__name__}).", "invalid")

            return run

        async def form(request: Request, rec: Recorded) -> dict[str, Any]:
            """The form's fields (a repeated one: its last copy), files as bytes."""
            kind = media(request.headers.get("content-type"))
            if kind.boundary is None:
                raise BadRequest("This endpoint takes multipart/form-data.")

            async def chunks() -> AsyncIterator[bytes]:
                yield rec.body

            parsed = await read_form(chunks(), kind.boundary, frozenset(), len(rec.body) + 1)
            out: dict[str, Any] = {}
            try:
                for part in parsed.parts:
                    if part.spool is None:
                        out[part.name] = bytes(part.value).decode()
                        continue
                    part.spool.seek(0)
                    out[part.name] = part.spool.read()
                    out["_filename"] = part.filename
            finally:
                parsed.close()
            return out

        self.record = record
        self.headers = headers
        self.error = error
        self.new_id = new_id
        self.ok = ok
        self.listing = listing
        self.missing = missing
        self.handler = handler
        self.form = form

    def on_both(self, path: str, fn: Callable[..., Any], methods: list[str]) -> list[Route]:
        """Routes for ``fn`` (recorded, authenticated: ``handler``) on ``path`` under the
        v1 prefix and the ``?api-version=`` prefix."""
        handler = self.handler
        return [
            Route(prefix + path, handler(fn), methods=methods)
            for prefix in ("/openai/v1", "/openai")
        ]
