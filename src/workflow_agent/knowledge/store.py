"""The knowledge base: parsed documents in a SQLite file, passages searched with FTS5.

It is its own file (``WorkflowConfiguration.knowledge_database``: ``data_dir/knowledge.db``),
not a table in the history store: FTS5 is SQLite-only and history may live in PostgreSQL.
Standard library only (``sqlite3``).

    documents   one row per (source, integration): where, when, content hash, title
    facts       the structured knowledge of a document (one JSON row each)
    passages    the text search returns, with the section it sits in
    passages_fts  FTS5 index over (title, section, text, tag), kept in step by triggers;
                  bm25-ranked. ``tag`` is one token naming the integration, so that FTS
                  itself filters by integration before it ranks.

Adding a source again replaces its document (keeping its id) when the content changed and
does nothing when it did not (same hash).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workflow_agent.errors import KnowledgeError
from workflow_agent.knowledge.extract import DocumentKnowledge, Passage

if TYPE_CHECKING:
    from workflow_agent.facts import Facts
    from workflow_agent.knowledge.fetch import Document

SCHEMA_VERSION = 1
#: bm25 weights of the FTS columns (title, section, text, tag): a word in a heading counts
#: more. Set as the table's ``rank`` so that FTS5 ranks and cuts before any join.
_RANK = "bm25(1.5, 2.0, 1.0, 0.0)"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    integration TEXT NOT NULL DEFAULT '',
    title TEXT NOT NULL,
    content_type TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    retrieved_at TEXT NOT NULL,
    UNIQUE (source, integration)
);
CREATE INDEX IF NOT EXISTS documents_integration ON documents (integration);
CREATE TABLE IF NOT EXISTS facts (
    document_id INTEGER PRIMARY KEY REFERENCES documents (id) ON DELETE CASCADE,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY,
    document_id INTEGER NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    -- the document's title, repeated so that FTS finds passages of a page by its name
    title TEXT NOT NULL,
    section TEXT NOT NULL,
    text TEXT NOT NULL,
    tag TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_document ON passages (document_id, seq);
CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5 (
    title, section, text, tag, content='passages', content_rowid='id',
    tokenize='porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS passages_ai AFTER INSERT ON passages BEGIN
    INSERT INTO passages_fts (rowid, title, section, text, tag)
    VALUES (new.id, new.title, new.section, new.text, new.tag);
END;
CREATE TRIGGER IF NOT EXISTS passages_ad AFTER DELETE ON passages BEGIN
    INSERT INTO passages_fts (passages_fts, rowid, title, section, text, tag)
    VALUES ('delete', old.id, old.title, old.section, old.text, old.tag);
END;
"""
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class StoredDocument:
    """A document in the knowledge base, with its facts and passages."""

    id: int
    source: str
    integration: str
    title: str
    content_type: str
    content_hash: str
    retrieved_at: str
    knowledge: DocumentKnowledge
    #: False when ``add`` found the same content already stored.
    changed: bool = True


@dataclass(frozen=True)
class Hit:
    """A passage that matched, with where it comes from (its citation)."""

    passage_id: int
    document_id: int
    source: str
    title: str
    integration: str
    section: str
    text: str
    #: -bm25: higher is better.
    score: float

    @property
    def citation(self) -> str:
        """``source § section``: enough for a person (or an LLM prompt) to look it up."""
        return f"{self.source} § {self.section}" if self.section else self.source


class KnowledgeBase:
    """The knowledge base in one SQLite file; use as a context manager or ``close()``."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        if not create and not path.is_file():
            raise KnowledgeError(f"no knowledge base at {path}",
                                 hint="Add documentation first: workflow-agent knowledge add URL")
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=10.0)
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            with self._db:
                if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    self._db.executescript(_SCHEMA)
                    self._db.execute("INSERT INTO passages_fts (passages_fts, rank) "
                                     f"VALUES ('rank', '{_RANK}')")
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise KnowledgeError(
                f"cannot open the knowledge base {path}: {exc}",
                hint="Check that the data directory is writable (WORKFLOW_AGENT_DATA_DIR).",
            ) from exc

    @classmethod
    def existing(cls, path: Path) -> KnowledgeBase | None:
        """The knowledge base at ``path`` if the file exists; never creates one."""
        return cls(path, create=False) if path.is_file() else None

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise KnowledgeError(f"knowledge base {self.path}: {doing} failed: {exc}",
                                 hint="If the file is damaged, remove it and add the "
                                 "documents again.") from exc

    # -- writing ------------------------------------------------------------------------

    def add(self, document: Document, knowledge: DocumentKnowledge,
            integration: str | None = None) -> StoredDocument:
        """Store a parsed document (replacing an older copy of the same source)."""
        tag = integration or ""
        digest = document.content_hash
        with self._errors("adding a document"), self._db:
            row = self._db.execute(
                "SELECT id, content_hash FROM documents WHERE source = ? AND integration = ?",
                (document.source, tag)).fetchone()
            if row is not None and row[1] == digest:
                return self.show(row[0], changed=False)
            values = (knowledge.title, document.content_type, digest,
                      document.retrieved_at.isoformat(timespec="seconds"))
            if row is not None:  # new content for a known source: same id, new facts
                document_id = int(row[0])
                self._db.execute("DELETE FROM passages WHERE document_id = ?", (document_id,))
                self._db.execute("DELETE FROM facts WHERE document_id = ?", (document_id,))
                self._db.execute(
                    "UPDATE documents SET title = ?, content_type = ?, content_hash = ?,"
                    " retrieved_at = ? WHERE id = ?", (*values, document_id))
            else:
                cursor = self._db.execute(
                    "INSERT INTO documents (source, integration, title, content_type,"
                    " content_hash, retrieved_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (document.source, tag, *values))
                document_id = int(cursor.lastrowid or 0)
            self._db.execute("INSERT INTO facts (document_id, data) VALUES (?, ?)",
                             (document_id, json.dumps(knowledge.facts_dict())))
            self._db.executemany(
                "INSERT INTO passages (document_id, seq, title, section, text, tag)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(document_id, seq, knowledge.title, p.section, p.text, _tag(tag))
                 for seq, p in enumerate(knowledge.passages)])
        return self.show(document_id)

    # -- reading ------------------------------------------------------------------------

    def show(self, document_id: int, *, changed: bool = True) -> StoredDocument:
        """One document with its facts and passages; an error names what to do if absent."""
        with self._errors("reading a document"):
            row = self._db.execute(
                "SELECT d.id, d.source, d.integration, d.title, d.content_type, d.content_hash,"
                " d.retrieved_at, f.data FROM documents d JOIN facts f ON f.document_id = d.id"
                " WHERE d.id = ?", (document_id,)).fetchone()
            if row is None:
                raise KnowledgeError(
                    f"no document {document_id} in the knowledge base",
                    hint="`workflow-agent knowledge search QUERY` shows document ids.")
            passages = [Passage(section, text) for section, text in self._db.execute(
                "SELECT section, text FROM passages WHERE document_id = ? ORDER BY seq",
                (document_id,))]
        knowledge = DocumentKnowledge.from_facts(json.loads(row[7]), passages)
        return StoredDocument(int(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]),
                              str(row[5]), str(row[6]), knowledge, changed)

    def documents(self, integration: str | None = None) -> list[tuple[int, str, str, str]]:
        """(id, source, integration, title) of every document, or of one integration's."""
        with self._errors("listing documents"):
            if integration is None:
                rows = self._db.execute(
                    "SELECT id, source, integration, title FROM documents ORDER BY id")
            else:
                rows = self._db.execute(
                    "SELECT id, source, integration, title FROM documents WHERE integration = ?"
                    " ORDER BY id", (integration,))
            return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]

    def search(self, query: str, integration: str | None = None, limit: int = 10) -> list[Hit]:
        """Passages matching ``query``, best first (bm25).

        The query is words, not FTS syntax: all words must match; when no passage has
        them all, passages with any of them are ranked instead.
        """
        words = _words(query)
        if not words:
            return []
        hits = self._match(" AND ".join(words), integration, limit)
        return hits or self._match(" OR ".join(words), integration, limit)

    def passages_for(self, integration: str, facts: Facts | None = None,
                     limit: int = 5) -> list[Hit]:
        """The few passages that matter for installing ``integration`` on ``facts``.

        Documents added with ``--integration NAME`` are searched first; without any, all
        documents, for passages naming the integration. Terms from the facts (distro,
        package manager, init system) and from installing (install, configuration,
        port, service, verify) rank the passages; at most two come from one section.
        """
        terms = ["install", "configuration", "config", "port", "service", "start", "enable",
                 "verify", "metrics", "listen", "package"]
        if facts is not None:
            terms += [facts.os_family, facts.distro, facts.distro_codename,
                      facts.package_manager or "", facts.init_system]
            terms += {"apt": ["apt-get", "deb"], "dnf": ["yum", "rpm"], "yum": ["rpm"]}.get(
                facts.package_manager or "", [])
            terms += {"systemd": ["systemctl", "unit"], "sysv": ["init.d", "update-rc.d"]}.get(
                facts.init_system, [])
        name = _words(integration)
        tagged = bool(self.documents(integration))
        wanted = " OR ".join(dict.fromkeys(_words(" ".join(terms)) + name))
        if tagged:
            hits = self._match(wanted, integration, limit * 4)
        else:
            named = " AND ".join(name)
            hits = self._match(f"({named}) AND ({wanted})", None, limit * 4) or \
                self._match(named, None, limit * 4)
        chosen: list[Hit] = []
        per_section: dict[tuple[int, str], int] = {}
        for hit in hits:
            key = (hit.document_id, hit.section)
            if per_section.get(key, 0) < 2:
                per_section[key] = per_section.get(key, 0) + 1
                chosen.append(hit)
            if len(chosen) == limit:
                break
        return chosen

    def _match(self, expression: str, integration: str | None, limit: int) -> list[Hit]:
        # Rank and cut inside FTS5 first (ORDER BY rank LIMIT), then join only the winners:
        # joining every match before sorting was most of the time on 10,000 passages.
        if integration is not None:
            expression = f"tag : {_tag(integration)} AND ({expression})"
        params: list[Any] = [expression, limit]
        sql = ("SELECT p.id, p.document_id, d.source, d.title, d.integration, p.section, "
               "p.text, -m.rank FROM (SELECT rowid AS id, rank FROM passages_fts "
               "WHERE passages_fts MATCH ? ORDER BY rank LIMIT ?) m "
               "JOIN passages p ON p.id = m.id JOIN documents d ON d.id = p.document_id "
               "ORDER BY m.rank")
        with self._errors("searching"):
            return [Hit(*row) for row in self._db.execute(sql, params)]


def _tag(integration: str) -> str:
    """One FTS token for an integration name (names hold '-', which FTS splits on)."""
    return "intg" + hashlib.sha256(integration.encode()).hexdigest()[:20] if integration else ""


def _words(text: str) -> list[str]:
    """Words as quoted FTS5 strings: user text can never be FTS syntax (or an error)."""
    return [f'"{w}"' for w in dict.fromkeys(_WORD.findall(text.lower()))]


def format_passages(hits: Sequence[Hit], max_chars: int = 1200) -> str:
    """Passages with their citations, as text for an LLM prompt (each cut to ``max_chars``)."""
    parts = []
    for number, hit in enumerate(hits, 1):
        text = hit.text if len(hit.text) <= max_chars else hit.text[:max_chars] + " …"
        parts.append(f"[{number}] {hit.citation}\n{text}")
    return "\n\n".join(parts)
