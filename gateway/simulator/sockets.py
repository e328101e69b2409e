"""The simulator's WebSockets, as Azure serves them: the Responses API WebSocket mode
(``response.create`` frames in, the same events as a stream out, one JSON text frame
each; an ``error`` frame for what it refuses, the socket staying open), and Realtime
(the deployment in the query; ``session.created`` first, ``session.update`` answered,
``response.create`` answered with a text delta and ``response.done`` with usage;
binary frames echoed)."""

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
    """The Responses WebSocket mode and Realtime, on both path forms each."""
    sim = ctx.sim

    async def handshake(ws: WebSocket) -> dict[str, str] | None:
        """Record the handshake and check its credential (None: refused, closed)."""
        headers = {k.lower(): v for k, v in ws.headers.items()}
        rec = Recorded("WEBSOCKET", ws.url.path, ws.url.query, headers, b"")
        sim.requests.append(rec)
        if sim.on_request is not None:
            sim.on_request(rec)
        auth = headers.get("authorization", "")
        if not (auth.startswith("Bearer sim-token-") or headers.get("api-key") == sim.api_key):
            await ws.close(1008, "invalid credentials")
            return None
        return headers

    async def responses_socket(ws: WebSocket) -> None:
        headers = await handshake(ws)
        if headers is None:
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
                if body.get("input") == "sim:close":  # the upstream breaks off (tests)
                    await ws.close(1011, "simulated failure")
                    return
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

    async def realtime_socket(ws: WebSocket) -> None:
        headers = await handshake(ws)
        if headers is None:
            return
        deployment = ws.query_params.get("model") or ws.query_params.get("deployment")
        if not deployment:
            await ws.close(1008, "model (or deployment) is required")
            return
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        sim.sockets_open += 1
        session: Json = {"id": ctx.new_id("sess"), "object": "realtime.session"}
        session["model"] = deployment
        await ws.send_text(json.dumps({"type": "session.created", "session": session}))
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await ws.send_bytes(message["bytes"])  # echoed: binary frames pass through
                    continue
                text = message.get("text") or ""
                sim.ws_frames.append(text)
                try:
                    frame: Any = json.loads(text)
                except ValueError:
                    await ws.send_text(_error_frame("invalid_json", "The frame is not JSON."))
                    continue
                kind = frame.get("type") if isinstance(frame, dict) else None
                if kind == "session.update":
                    session.update(frame.get("session") or {})
                    await ws.send_text(json.dumps({"type": "session.updated", "session": session}))
                elif kind == "response.create":
                    rid = ctx.new_id("resp")
                    await ws.send_text(
                        json.dumps({"type": "response.created", "response": {"id": rid}})
                    )
                    await ws.send_text(
                        json.dumps({"type": "response.output_text.delta", "delta": "Hello"})
                    )
                    usage = {
                        "total_tokens": 30,
                        "input_tokens": 12,
                        "output_tokens": 18,
                        "input_token_details": {"text_tokens": 4, "audio_tokens": 8},
                        "output_token_details": {"text_tokens": 6, "audio_tokens": 12},
                    }
                    done = {"id": rid, "status": "completed", "usage": usage, "output": []}
                    await ws.send_text(json.dumps({"type": "response.done", "response": done}))
        except WebSocketDisconnect:
            pass
        finally:
            sim.sockets_open -= 1

    return [
        WebSocketRoute("/openai/v1/responses", responses_socket),
        WebSocketRoute("/openai/responses", responses_socket),
        WebSocketRoute("/openai/v1/realtime", realtime_socket),
        WebSocketRoute("/openai/realtime", realtime_socket),
    ]
