"""Reading a request body: the idle timer, and cancellations that are not its own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.body import read_body
from gateway.errors import PayloadTooLarge, RequestTimeout


def _receiver(*messages: dict[str, Any], then_hang: bool = True) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            await asyncio.sleep(0)
            return queue.pop(0)
        if then_hang:
            await asyncio.Event().wait()
        raise AssertionError("read past the end")

    return receive


def test_a_body_in_parts_is_read_whole_and_timers_do_not_linger() -> None:
    async def main() -> None:
        receive = _receiver(
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"", "more_body": True},
            {"type": "http.request", "body": b"c", "more_body": False},
        )
        assert await read_body(receive, 10, 0.2, "3") == b"abc"
        await asyncio.sleep(0.3)  # an idle timer left armed would cancel us here

    asyncio.run(main())


def test_a_body_that_stops_arriving_is_a_408() -> None:
    async def main() -> None:
        receive = _receiver({"type": "http.request", "body": b"ab", "more_body": True})
        with pytest.raises(RequestTimeout, match=r"stopped arriving for 0\.1 s"):
            await read_body(receive, 10, 0.1, None)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the timer's cancel is undone
        await asyncio.sleep(0.01)  # and this task can still await

    asyncio.run(main())


def test_a_cancel_from_outside_stays_a_cancel() -> None:
    async def main() -> None:
        reader = asyncio.create_task(read_body(_receiver(), 10, 0.1, None))
        await asyncio.sleep(0.02)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(main())


def test_an_outside_cancel_racing_the_idle_timer_stays_a_cancel() -> None:
    async def main() -> None:
        reader = asyncio.create_task(read_body(_receiver(), 10, 0.05, None))
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        # The outside cancel lands in the same loop turn as the timer's.
        loop.call_at(loop.time() + 0.04, reader.cancel)
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(main())


def test_a_body_past_the_limit_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(PayloadTooLarge, match="99 bytes"):
            await read_body(_receiver(), 10, 1, "99")
        receive = _receiver({"type": "http.request", "body": b"x" * 11, "more_body": False})
        with pytest.raises(PayloadTooLarge, match="exceeds the limit of 10"):
            await read_body(receive, 10, 1, None)

    asyncio.run(main())
