"""The knowledge agent: what we know about an integration, for these facts.

The integration's definition and templates from the registry and, when a knowledge base
file exists (``workflow-agent knowledge add``), the few documentation passages that
matter for this integration on these facts, each with its citation. Without that file
nothing is opened or imported: a plain run pays nothing for the knowledge base.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workflow_agent.bus import Message, MessageBus
from workflow_agent.config import KnowledgeSettings
from workflow_agent.errors import KnowledgeError
from workflow_agent.facts import Facts
from workflow_agent.integrations.registry import Integration, Registry

if TYPE_CHECKING:
    from workflow_agent.knowledge.store import Hit, StoredDocument

TOPIC = "knowledge.retrieve"
DOCUMENTATION = "knowledge.documentation"


@dataclass(frozen=True)
class KnowledgeRequest:
    """Ask for what is known about ``integration`` on a target with ``facts``."""

    integration: str
    #: With facts (the knowledge stage), documentation passages are looked up too.
    facts: Facts | None = None


@dataclass(frozen=True)
class Knowledge:
    """The integration, the documentation passages that matter, and where all came from."""

    integration: Integration
    sources: tuple[str, ...]
    #: Best first; ``hit.citation`` names source and section, ``hit.text`` is the passage.
    passages: tuple[Hit, ...] = ()


@dataclass(frozen=True)
class DocumentationRequest:
    """Add ``add`` (URLs or files) to the knowledge base for ``integration``, then
    return its passages for ``facts``; the integration need not exist yet."""

    integration: str
    facts: Facts
    add: tuple[str, ...] = ()


@dataclass(frozen=True)
class Documentation:
    """The passages that matter (best first) and where they came from."""

    sources: tuple[str, ...]
    passages: tuple[Hit, ...]


class KnowledgeAgent:
    """Answers ``knowledge.retrieve`` from the registry and the knowledge base."""

    def __init__(self, registry: Registry, knowledge_db: Path | None = None,
                 passages: int = 5, settings: KnowledgeSettings | None = None) -> None:
        self.registry = registry
        self.knowledge_db = knowledge_db
        self.passages = passages
        self.settings = settings or KnowledgeSettings()

    def attach(self, bus: MessageBus) -> None:
        """Serve this agent's topics on ``bus``."""
        bus.serve(TOPIC, self._retrieve)
        bus.serve(DOCUMENTATION, self._documentation)

    async def _documentation(self, message: Message) -> Documentation:
        request: DocumentationRequest = message.payload
        if self.knowledge_db is None:
            raise KnowledgeError("no knowledge base is configured for this run")
        path = self.knowledge_db
        added: list[str] = []
        for source in request.add:
            stored = await asyncio.to_thread(self._add, path, source, request.integration)
            added.append(f"document {stored.id} {stored.source} (retrieved "
                         f"{stored.retrieved_at})")
        hits = self._passages(path, request.integration, request.facts)
        return Documentation((*added, *(f"passage {h.citation}" for h in hits)), tuple(hits))

    def _add(self, path: Path, source: str, integration: str) -> StoredDocument:
        from workflow_agent.knowledge.fetch import FetchLimits, load
        from workflow_agent.knowledge.parse import parse
        from workflow_agent.knowledge.store import KnowledgeBase

        document = load(source, FetchLimits.from_settings(self.settings))
        with KnowledgeBase(path) as base:
            return base.add(document, parse(document), integration)

    async def _retrieve(self, message: Message) -> Knowledge:
        request: KnowledgeRequest = message.payload
        integration = self.registry.get(request.integration)
        sources = (
            f"definition {integration.root / 'definition.yaml'} ({integration.source})",
            f"templates {integration.templates_dir}",
        )
        if request.facts is None or self.knowledge_db is None or \
                not self.knowledge_db.is_file():
            return Knowledge(integration, sources)
        try:
            hits = self._passages(self.knowledge_db, request.integration, request.facts)
        except KnowledgeError as exc:
            # The knowledge base is optional: a broken one is reported, not fatal.
            return Knowledge(integration, (*sources, f"knowledge base unusable: {exc.message}"))
        return Knowledge(integration, (*sources, *(f"passage {h.citation}" for h in hits)),
                         tuple(hits))

    def _passages(self, path: Path, integration: str, facts: Facts) -> list[Hit]:
        from workflow_agent.knowledge.store import KnowledgeBase

        base = KnowledgeBase.existing(path)
        if base is None:
            return []
        with base:
            return base.passages_for(integration, facts, self.passages)
