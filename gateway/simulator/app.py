"""The simulator app: its endpoint modules, a managed-identity token endpoint, and
Azure's JSON 404 for everything else."""

from __future__ import annotations

import asyncio
import secrets
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import batches, models, objects, responses, safety, sockets
from .base import IDENTITY_HEADER, Ctx, Recorded, SimState
from .shapes import _error


def create_simulator(state: SimState | None = None) -> Starlette:
    """The simulator ASGI app; ``app.state.sim`` is its ``SimState``."""
    sim = state or SimState()
    ctx = Ctx(sim)

    async def token(request: Request) -> Response:
        sim.requests.append(
            Recorded("GET", request.url.path, request.url.query, dict(request.headers), b"")
        )
        if request.headers.get("x-identity-header") != IDENTITY_HEADER:
            return JSONResponse({"error": "invalid identity header"}, 401)
        if not request.query_params.get("resource"):
            return JSONResponse({"error": "resource is required"}, 400)
        if sim.token_delay:
            await asyncio.sleep(sim.token_delay)
        tok = f"sim-token-{len(sim.tokens_issued)}-{secrets.token_hex(8)}"
        sim.tokens_issued.append(tok)
        return JSONResponse(
            {
                "access_token": tok,
                "expires_on": str(int(time.time() + sim.token_expires_in)),
                "resource": request.query_params["resource"],
                "token_type": "Bearer",
            }
        )

    routes: list[BaseRoute] = [Route("/msi/token", token, methods=["GET"])]
    routes += responses.routes(ctx) + objects.routes(ctx) + models.routes(ctx)
    routes += sockets.routes(ctx)
    routes += batches.routes(ctx)
    routes += safety.routes(ctx)

    async def unknown(request: Request, exc: Exception) -> Response:
        """Paths and methods Azure does not have: its JSON 404 (not Starlette's text)."""
        return _error(404, "Resource not found", "404")

    app = Starlette(routes=routes, exception_handlers={404: unknown, 405: unknown})
    app.state.sim = sim
    return app
