"""The knowledge base: storing, FTS5/bm25 search, show, passages for a workflow, the agent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from workflow_agent.agents.knowledge import TOPIC, KnowledgeAgent, KnowledgeRequest
from workflow_agent.bus import MemoryBus
from workflow_agent.errors import KnowledgeError
from workflow_agent.facts import Facts
from workflow_agent.integrations.registry import Registry
from workflow_agent.knowledge.fetch import MARKDOWN, Document
from workflow_agent.knowledge.parse import parse
from workflow_agent.knowledge.store import KnowledgeBase, format_passages

FACTS = Facts(os_family="debian", distro="debian", distro_version="12",
              distro_codename="bookworm", arch="amd64", package_manager="apt",
              init_system="sysv")

NODE_DOC = """# Node exporter

## Installation

On Debian, install the package with apt-get:

```console
$ sudo apt-get install prometheus-node-exporter
```

With sysv init, start it through its init script: `/etc/init.d/prometheus-node-exporter start`.

## Configuration

Arguments go in `/etc/default/prometheus-node-exporter` (ARGS). It listens on port 9100.

## Collectors

The textfile collector reads `*.prom` files. The cpu collector exposes CPU statistics.
"""
OTHER_DOC = """# Qux dashboard

## Installation

Download the qux tarball and run it. The dashboard shows CPU graphs.
"""


def document(source: str, text: str) -> Document:
    return Document(source, MARKDOWN, text)


def add(base: KnowledgeBase, source: str, text: str, integration: str | None = None) -> int:
    doc = document(source, text)
    return base.add(doc, parse(doc), integration).id


def test_add_show_and_readd(tmp_path: Path) -> None:
    with KnowledgeBase(tmp_path / "kb.db") as base:
        first = base.add(document("https://x/node.md", NODE_DOC), parse(
            document("https://x/node.md", NODE_DOC)), "prometheus-node-exporter")
        shown = base.show(first.id)
        assert shown.source == "https://x/node.md"
        assert shown.integration == "prometheus-node-exporter"
        assert shown.knowledge.ports == (9100,)
        assert shown.knowledge.commands[0].command == \
            "sudo apt-get install prometheus-node-exporter"
        assert shown.knowledge == parse(document("https://x/node.md", NODE_DOC))
        assert len(shown.content_hash) == 64 and shown.retrieved_at[:2] == "20"
        # The same content again: nothing changes.
        again = base.add(document("https://x/node.md", NODE_DOC),
                         parse(document("https://x/node.md", NODE_DOC)), "prometheus-node-exporter")
        assert (again.id, again.changed) == (first.id, False)
        # New content for the same source replaces the old passages.
        changed = NODE_DOC.replace("textfile collector", "hwmon collector")
        replaced = base.add(document("https://x/node.md", changed),
                            parse(document("https://x/node.md", changed)),
                            "prometheus-node-exporter")
        assert (replaced.id, replaced.changed) == (first.id, True)
        assert replaced.content_hash != first.content_hash
        assert base.search("textfile") == []
        assert [h.document_id for h in base.search("hwmon")] == [first.id]
        assert [d[0] for d in base.documents()] == [first.id]
        with pytest.raises(KnowledgeError, match="no document 999") as caught:
            base.show(999)
        assert caught.value.hint and "knowledge search" in caught.value.hint


def test_search_ranks_by_bm25_and_filters(tmp_path: Path) -> None:
    with KnowledgeBase(tmp_path / "kb.db") as base:
        node = add(base, "/docs/node.md", NODE_DOC, "prometheus-node-exporter")
        qux = add(base, "/docs/qux.md", OTHER_DOC, "qux")
        hits = base.search("cpu collector")
        # All words: only the node passage has both; it names "collector" twice.
        assert [(h.document_id, h.section) for h in hits] == [(node, "Collectors")]
        assert hits[0].citation == "/docs/node.md § Collectors"
        # No passage has every word: any word counts, ranked by bm25.
        hits = base.search("dashboard textfile")
        assert {h.document_id for h in hits} == {qux, node}
        assert hits[0].score >= hits[1].score
        assert [h.document_id for h in base.search("cpu", integration="qux")] == [qux]
        assert base.search("install", limit=1)[0].section == "Installation"
        # User text is never FTS syntax: quotes, operators and punctuation are just words.
        assert [h.document_id for h in base.search('9100" NEAR( -* ^')] == [node]
        assert [h.document_id for h in base.search('port" 9100/( :')] == [node]
        assert base.search("   ...   ") == []


def test_passages_for_an_integration_and_facts(tmp_path: Path) -> None:
    with KnowledgeBase(tmp_path / "kb.db") as base:
        add(base, "/docs/node.md", NODE_DOC, "prometheus-node-exporter")
        add(base, "/docs/qux.md", OTHER_DOC, "qux")
        hits = base.passages_for("prometheus-node-exporter", FACTS, limit=2)
        assert [h.section for h in hits] == ["Installation", "Configuration"]
        assert all(h.integration == "prometheus-node-exporter" for h in hits)
        prompt = format_passages(hits)
        assert prompt.startswith("[1] /docs/node.md § Installation\n")
        assert "[2] /docs/node.md § Configuration" in prompt
        # Untagged documents: passages that name the integration.
        add(base, "/docs/untagged.md", NODE_DOC.replace("Node exporter", "Zork agent"))
        zork = base.passages_for("zork-agent", FACTS)
        assert {h.source for h in zork} == {"/docs/untagged.md"}
        assert base.passages_for("nothing-like-it", FACTS) == []


def test_existing_never_creates(tmp_path: Path) -> None:
    path = tmp_path / "data" / "knowledge.db"
    assert KnowledgeBase.existing(path) is None
    assert not path.exists()
    with pytest.raises(KnowledgeError, match="no knowledge base"):
        KnowledgeBase(path, create=False)


def ask(agent: KnowledgeAgent, request: KnowledgeRequest) -> object:
    async def go() -> object:
        bus = MemoryBus()
        agent.attach(bus)
        return await bus.request(TOPIC, request, timeout=10)

    return asyncio.run(go())


def test_knowledge_agent_adds_cited_passages_only_when_a_base_exists(tmp_path: Path) -> None:
    path = tmp_path / "knowledge.db"
    agent = KnowledgeAgent(Registry.discover(entry_points=False), path)
    reply = ask(agent, KnowledgeRequest("prometheus-node-exporter", FACTS))
    assert reply.passages == ()  # type: ignore[attr-defined]
    assert not path.exists()  # a run without a knowledge base does not create one
    with KnowledgeBase(path) as base:
        add(base, "/docs/node.md", NODE_DOC, "prometheus-node-exporter")
    reply = ask(agent, KnowledgeRequest("prometheus-node-exporter", FACTS))
    passages = reply.passages  # type: ignore[attr-defined]
    assert passages[0].citation == "/docs/node.md § Installation"
    assert "passage /docs/node.md § Installation" in reply.sources  # type: ignore[attr-defined]
    # The validate stage asks without facts: no passages looked up.
    assert ask(agent, KnowledgeRequest("prometheus-node-exporter")).passages == ()  # type: ignore[attr-defined]


def test_a_broken_knowledge_base_is_reported_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "knowledge.db"
    path.write_bytes(b"this is not a database" * 100)
    agent = KnowledgeAgent(Registry.discover(entry_points=False), path)
    reply = ask(agent, KnowledgeRequest("prometheus-node-exporter", FACTS))
    assert reply.passages == ()  # type: ignore[attr-defined]
    assert any(s.startswith("knowledge base unusable") for s in reply.sources)  # type: ignore[attr-defined]
