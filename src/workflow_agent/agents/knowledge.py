"""The knowledge agent: what we know about an integration, for these facts.

Today that is the integration's definition and templates from the registry; the
knowledge base of parsed documentation and past failures plugs in here.
"""

from __future__ import annotations

from dataclasses import dataclass

from workflow_agent.bus import Message, MessageBus
from workflow_agent.facts import Facts
from workflow_agent.integrations.registry import Integration, Registry

TOPIC = "knowledge.retrieve"


@dataclass(frozen=True)
class KnowledgeRequest:
    """Ask for what is known about ``integration`` on a target with ``facts``."""

    integration: str
    facts: Facts | None = None


@dataclass(frozen=True)
class Knowledge:
    """The integration and where its knowledge came from."""

    integration: Integration
    sources: tuple[str, ...]


class KnowledgeAgent:
    """Answers ``knowledge.retrieve`` from the integration registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def attach(self, bus: MessageBus) -> None:
        """Serve this agent's topics on ``bus``."""
        bus.serve(TOPIC, self._retrieve)

    async def _retrieve(self, message: Message) -> Knowledge:
        request: KnowledgeRequest = message.payload
        integration = self.registry.get(request.integration)
        sources = (
            f"definition {integration.root / 'definition.yaml'} ({integration.source})",
            f"templates {integration.templates_dir}",
        )
        return Knowledge(integration, sources)
