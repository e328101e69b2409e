"""In-memory state for a single replica."""

from __future__ import annotations

import time
from collections import OrderedDict

from . import Binding


class MemoryState:
    """Response bindings in a dict, oldest evicted first past ``max_bindings``."""

    def __init__(self, max_bindings: int = 1_000_000) -> None:
        self._bindings: OrderedDict[str, tuple[Binding, float]] = OrderedDict()
        self._max = max_bindings

    async def bind_response(self, response_id: str, binding: Binding, ttl: float) -> None:
        self._bindings[response_id] = (binding, time.monotonic() + ttl)
        self._bindings.move_to_end(response_id)
        while len(self._bindings) > self._max:
            self._bindings.popitem(last=False)

    async def get_binding(self, response_id: str) -> Binding | None:
        item = self._bindings.get(response_id)
        if item is None:
            return None
        if item[1] <= time.monotonic():
            del self._bindings[response_id]
            return None
        return item[0]

    async def delete_binding(self, response_id: str) -> None:
        self._bindings.pop(response_id, None)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
