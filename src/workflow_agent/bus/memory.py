"""In-process bus: the default when all agents run in one process."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from workflow_agent.bus.base import BusTimeoutError, Handler, Message, MessageBus, NoHandlerError


class MemoryBus(MessageBus):
    """Delivers messages by calling handlers directly, in subscription order."""

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, list[Handler]] = defaultdict(list)
        self._servers: dict[str, Handler] = {}

    def subscribe(self, topic: str, handler: Handler) -> None:
        self._subscribers[topic].append(handler)

    def serve(self, topic: str, handler: Handler) -> None:
        if topic in self._servers:
            raise ValueError(f"topic {topic!r} already has a server")
        self._servers[topic] = handler

    async def publish(self, topic: str, payload: Any) -> None:
        message = Message(topic, payload)
        # In order, so a history subscriber has written a stage before the next begins.
        for handler in list(self._subscribers.get(topic, ())):
            await handler(message)

    async def request(self, topic: str, payload: Any, *, timeout: float) -> Any:
        handler = self._servers.get(topic)
        if handler is None:
            raise NoHandlerError(f"no agent answers {topic!r}")
        message = Message(topic, payload, reply_to=f"{topic}.reply")
        try:
            return await asyncio.wait_for(handler(message), timeout)
        except TimeoutError:
            raise BusTimeoutError(
                f"no reply on {topic!r} within {timeout:g} s",
                hint="Raise bus_timeout in the configuration if the work is slow.",
            ) from None
