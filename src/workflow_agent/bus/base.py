"""The ``MessageBus`` seam: publish/subscribe for events, request/reply for work.

Topics used by the workflow (payload types live with the agents that answer them):
``knowledge.retrieve``, ``script.generate``, ``script.validate``, ``target.facts``,
``target.snapshot``, ``execute.run``, ``verify.run``, ``verify.leftovers``; events
``workflow.stage`` (a stage ended, with the new state) and ``workflow.output`` (a line a
script printed).
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from workflow_agent.errors import WorkflowAgentError

#: A subscriber: receives the message; for requests, what it returns is the reply.
Handler = Callable[["Message"], Awaitable[Any]]


@dataclass(frozen=True)
class Message:
    """One message on the bus."""

    topic: str
    payload: Any
    correlation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Set on requests: the topic the reply goes to.
    reply_to: str | None = None


class BusTimeoutError(WorkflowAgentError):
    """A request got no reply in time."""


class NoHandlerError(WorkflowAgentError):
    """A request was sent to a topic nobody answers."""


class MessageBus(ABC):
    """Async pub/sub and request/reply between agents."""

    @abstractmethod
    def subscribe(self, topic: str, handler: Handler) -> None:
        """Call ``handler`` for every message on ``topic``."""

    @abstractmethod
    def serve(self, topic: str, handler: Handler) -> None:
        """Answer requests on ``topic`` with ``handler``; one server per topic."""

    @abstractmethod
    async def publish(self, topic: str, payload: Any) -> None:
        """Deliver an event to every subscriber; returns when they have handled it."""

    @abstractmethod
    async def request(self, topic: str, payload: Any, *, timeout: float) -> Any:
        """Send a request and return the reply; the server's exception is raised here."""

    async def close(self) -> None:
        """Release connections. The default has nothing to release."""
