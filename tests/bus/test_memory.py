"""The in-memory bus: ordered delivery, request/reply, timeouts, errors."""

from __future__ import annotations

import asyncio

import pytest

from workflow_agent.bus import BusTimeoutError, MemoryBus, Message, NoHandlerError


def test_publish_reaches_every_subscriber_in_order() -> None:
    bus = MemoryBus()
    seen: list[tuple[str, int]] = []

    async def first(message: Message) -> None:
        await asyncio.sleep(0.01)  # a slow subscriber still finishes before the next
        seen.append(("first", message.payload))

    async def second(message: Message) -> None:
        seen.append(("second", message.payload))

    bus.subscribe("t", first)
    bus.subscribe("t", second)

    async def main() -> None:
        await bus.publish("t", 1)
        await bus.publish("t", 2)
        await bus.publish("other", 3)

    asyncio.run(main())
    assert seen == [("first", 1), ("second", 1), ("first", 2), ("second", 2)]


def test_request_reply_timeout_and_errors() -> None:
    bus = MemoryBus()

    async def double(message: Message) -> int:
        return int(message.payload) * 2

    async def slow(message: Message) -> None:
        await asyncio.sleep(5)

    async def broken(message: Message) -> None:
        raise ValueError("bad payload")

    bus.serve("double", double)
    bus.serve("slow", slow)
    bus.serve("broken", broken)
    with pytest.raises(ValueError, match="already has a server"):
        bus.serve("double", double)

    async def main() -> None:
        assert await bus.request("double", 21, timeout=1) == 42
        with pytest.raises(BusTimeoutError):
            await bus.request("slow", None, timeout=0.05)
        with pytest.raises(ValueError, match="bad payload"):
            await bus.request("broken", None, timeout=1)
        with pytest.raises(NoHandlerError):
            await bus.request("nobody", None, timeout=1)

    asyncio.run(main())
