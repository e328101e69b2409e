"""A local Azure OpenAI Responses API simulator, and a managed-identity token endpoint.

For the demo and the tests: both path forms, JSON and SSE with ``sequence_number``,
background mode with cancel and stream resume, input_items, compact, MCP items
when MCP tools are sent, and injected failures. Control per request with headers
``x-sim-status`` (answer with that error), ``x-sim-delay`` (seconds between stream
events) and ``x-sim-hang`` (seconds before answering), or through ``SimState``.
"""

from .app import create_simulator
from .base import IDENTITY_HEADER, Recorded, SimState
from .shapes import PNG, SPEECH, _input_items, build_response, encode_event, stream_events

__all__ = [
    "IDENTITY_HEADER",
    "PNG",
    "SPEECH",
    "Recorded",
    "SimState",
    "_input_items",
    "build_response",
    "create_simulator",
    "encode_event",
    "stream_events",
]
