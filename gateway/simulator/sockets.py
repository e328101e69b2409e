"""The simulator's WebSockets, as Azure serves them: the Responses API WebSocket mode
(``response.create`` frames in, the same events as a stream out, one JSON text frame
each; an ``error`` frame for what it refuses, the socket staying open)."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .base import Ctx, Recorded
from .shapes import Json


def _error_frame(code: str, message: str, param: str | None = None) -> str:
    error = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
    return json.dumps({"type": "error", "error": error})


def routes(ctx: Ctx) -> list[WebSocketRoute]:
    """The Responses WebSocket mode on both path forms."""
    sim = ctx.sim

    async def responses_socket(ws: WebSocket) -> None:
        headers = {k.lower(): v for k, v in ws.headers.items()}
        rec = Recorded("WEBSOCKET", ws.url.path, ws.url.query, headers, b"")
        sim.requests.append(rec)
        if sim.on_request is not None:
            sim.on_request(rec)
        auth = headers.get("authorization", "")
        if not (auth.startswith("Bearer sim-token-") or headers.get("api-key") == sim.api_key):
            await ws.close(1008, "invalid credentials")
            return
        await ws.accept()
        sim.sockets_open += 1
        try:
            while True:
                text = await ws.receive_text()
                sim.ws_frames.append(text)
                try:
                    frame: Any = json.loads(text)
                except ValueError:
                    await ws.send_text(_error_frame("invalid_json", "The frame is not JSON."))
                    continue
                if not isinstance(frame, dict) or frame.get("type") != "response.create":
                    await ws.send_text(_error_frame("unknown_event", "Unknown event type."))
                    continue
                body: Json = {k: v for k, v in frame.items() if k != "type"}
                made = ctx.produce(body, headers)
                if isinstance(made, Response):
                    error = json.loads(bytes(made.body))["error"]
                    await ws.send_text(_error_frame(error["code"], error["message"]))
                    continue
                for event in made[1]:
                    await ws.send_text(json.dumps(event))
        except WebSocketDisconnect:
            pass
        finally:
            sim.sockets_open -= 1

    return [
        WebSocketRoute("/openai/v1/responses", responses_socket),
        WebSocketRoute("/openai/responses", responses_socket),
    ]
