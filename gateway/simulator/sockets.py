"""The simulator's WebSockets, as Azure serves them: the Responses API WebSocket mode
(``response.create`` frames in, the same events as a stream out, one JSON text frame
each; an ``error`` frame for what it refuses, the socket staying open), and Realtime
(the deployment in the query; ``session.created`` first, ``session.update`` answered;
a response streams text deltas over time and ends in ``response.done`` with usage;
``response.create`` starts one, and so does the end of an audio turn while server-side
turn detection is on — Azure's default: an ``input_audio_buffer.append`` of non-zero
bytes starts speech, one of zero bytes (silence) ends the turn; ``response.cancel`` stops
one, whose ``response.done`` says ``cancelled`` with the usage so far; binary frames
echoed)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
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
        lock = asyncio.Lock()
        running: dict[str, asyncio.Task[None]] = {}
        speaking = False

        async def send(event: Json) -> None:
            async with lock:
                await ws.send_text(json.dumps(event))

        def vad() -> bool:
            """Server-side turn detection: on unless the session turned it off."""
            audio = session.get("audio")
            inner = audio.get("input") if isinstance(audio, dict) else None
            for holder in (inner, session):
                if isinstance(holder, dict) and "turn_detection" in holder:
                    return holder["turn_detection"] is not None
            return True

        def respond(by_server: bool) -> None:
            rid = ctx.new_id("resp")
            if by_server:
                sim.realtime_started.append(rid)
            running[rid] = asyncio.ensure_future(produce(rid))

        async def produce(rid: str) -> None:
            item = {"id": ctx.new_id("item"), "type": "message", "role": "assistant"}
            sent = 0
            status = "completed"
            try:
                await send({"type": "response.created", "response": {"id": rid}})
                await send({"type": "response.output_item.added", "response_id": rid, "item": item})
                for _ in range(sim.realtime_deltas):
                    await asyncio.sleep(sim.realtime_delta_seconds)
                    delta = {"type": "response.output_text.delta", "response_id": rid}
                    await send({**delta, "item_id": item["id"], "delta": "Hello"})
                    sent += 1
                await send({"type": "response.output_item.done", "response_id": rid, "item": item})
            except asyncio.CancelledError:
                status = "cancelled"
            finally:
                running.pop(rid, None)
            out_text = 6 if status == "completed" else 2 * sent
            out_audio = 12 if status == "completed" else 0
            usage = {
                "total_tokens": 12 + out_text + out_audio,
                "input_tokens": 12,
                "output_tokens": out_text + out_audio,
                "input_token_details": {"text_tokens": 4, "audio_tokens": 8},
                "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
            }
            done = {"id": rid, "status": status, "usage": usage, "output": []}
            with contextlib.suppress(Exception):
                await send({"type": "response.done", "response": done})

        await send({"type": "session.created", "session": session})
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    async with lock:
                        await ws.send_bytes(message["bytes"])  # echoed (the gateway refuses them)
                    continue
                text = message.get("text") or ""
                sim.ws_frames.append(text)
                try:
                    frame: Any = json.loads(text)
                except ValueError:
                    await send(json.loads(_error_frame("invalid_json", "The frame is not JSON.")))
                    continue
                kind = frame.get("type") if isinstance(frame, dict) else None
                if kind == "session.update":
                    session.update(frame.get("session") or {})
                    await send({"type": "session.updated", "session": session})
                elif kind == "input_audio_buffer.append" and vad():
                    try:
                        audio = base64.b64decode(str(frame.get("audio") or ""), validate=True)
                    except ValueError:  # binascii.Error: Azure answers an error event
                        error = _error_frame("invalid_value", "audio is not base64.", "audio")
                        await send(json.loads(error))
                        continue
                    if any(audio) and not speaking:
                        speaking = True
                        await send({"type": "input_audio_buffer.speech_started"})
                    elif audio and not any(audio) and speaking:  # silence ends the turn
                        speaking = False
                        user = {"id": ctx.new_id("item"), "type": "message", "role": "user"}
                        await send({"type": "input_audio_buffer.speech_stopped"})
                        await send({"type": "input_audio_buffer.committed", "item_id": user["id"]})
                        await send({"type": "conversation.item.created", "item": user})
                        respond(by_server=True)
                elif kind == "response.create":
                    if running:
                        error = json.loads(
                            _error_frame(
                                "conversation_already_has_active_response",
                                "A response is in progress.",
                            )
                        )
                        error["error"]["event_id"] = frame.get("event_id")
                        await send(error)
                    else:
                        respond(by_server=False)
                elif kind == "response.cancel":
                    rid = frame.get("response_id") or next(iter(running), None)
                    task = running.get(rid) if isinstance(rid, str) else None
                    if task is not None:
                        sim.realtime_cancelled.append(str(rid))
                        task.cancel()
                elif kind == "conversation.item.create":
                    item = frame.get("item") or {}
                    await send({"type": "conversation.item.created", "item": item})
        except WebSocketDisconnect:
            pass
        finally:
            for task in list(running.values()):
                task.cancel()
            sim.sockets_open -= 1

    return [
        WebSocketRoute("/openai/v1/responses", responses_socket),
        WebSocketRoute("/openai/responses", responses_socket),
        WebSocketRoute("/openai/v1/realtime", realtime_socket),
        WebSocketRoute("/openai/realtime", realtime_socket),
    ]
