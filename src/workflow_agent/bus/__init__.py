"""The message bus agents talk over: ``MessageBus`` and its in-memory implementation."""

from workflow_agent.bus.base import BusTimeoutError, Message, MessageBus, NoHandlerError
from workflow_agent.bus.memory import MemoryBus

__all__ = ["BusTimeoutError", "MemoryBus", "Message", "MessageBus", "NoHandlerError"]
