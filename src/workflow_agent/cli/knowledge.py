"""``workflow-agent knowledge``: add documentation to the knowledge base, search it, show it.

Registered by ``cli/app.py``. Only typer and the standard library are imported here at
start-up; fetching (httpx), parsing and SQLite are imported when a command runs. The
commands go through ``app._report`` like every reporting command: errors become a message,
a hint and the error's exit code; ``--output json`` prints machine-readable results.
"""

from __future__ import annotations

from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from workflow_agent.container import Container
    from workflow_agent.knowledge.store import Hit, StoredDocument

knowledge_app = typer.Typer(
    help="Documentation in the knowledge base: add pages, search them, show what was parsed.",
    no_args_is_help=True,
)


class OutputFormat(StrEnum):
    """How results are printed (the same choices as every other command)."""

    text = "text"
    json = "json"


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration file.")]
OutputOpt = Annotated[OutputFormat, typer.Option("--output", "-o", help="text or json.")]
IntegrationOpt = Annotated[str | None, typer.Option(
    "--integration", "-i", help="The integration this documentation is about.")]


def _report(config: Path | None, output: OutputFormat, load: Any, as_json: Any,
            show: Any) -> None:
    # app imports this module at start-up, so app's helpers are imported on use.
    from workflow_agent.cli import app

    app._report(config, app.OutputFormat(output.value), load, as_json, show)


@knowledge_app.command("add")
def add(
    source: Annotated[str, typer.Argument(
        metavar="URL|FILE", help="An http(s) URL or a file: HTML, Markdown, plain text or a "
        "man page (.gz is fine).")],
    integration: IntegrationOpt = None,
    config: ConfigOpt = None,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Fetch or read a documentation page, parse it, and store it with its source."""

    def load(container: Container) -> StoredDocument:
        from workflow_agent.knowledge.fetch import FetchLimits, load
        from workflow_agent.knowledge.parse import parse
        from workflow_agent.knowledge.store import KnowledgeBase

        settings = container.config
        document = load(source, FetchLimits.from_settings(settings.knowledge))
        with KnowledgeBase(settings.knowledge_database) as base:
            return base.add(document, parse(document), integration)

    _report(config, output, load, _document_json, _show_added)


@knowledge_app.command("search")
def search(
    query: Annotated[str, typer.Argument(help="Words to look for (all of them, else any).")],
    integration: IntegrationOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="How many passages.")] = 10,
    config: ConfigOpt = None,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """Passages that match, best first (SQLite FTS5, bm25), with their source and section."""

    def load(container: Container) -> list[Hit]:
        from workflow_agent.knowledge.store import KnowledgeBase

        base = KnowledgeBase.existing(container.config.knowledge_database)
        if base is None:
            return []
        with base:
            return base.search(query, integration, limit)

    _report(config, output, load, lambda hits: [_hit_json(h) for h in hits], _show_hits)


@knowledge_app.command("show")
def show(
    document_id: Annotated[int, typer.Argument(metavar="ID", help="A document id (see search).")],
    config: ConfigOpt = None,
    output: OutputOpt = OutputFormat.text,
) -> None:
    """One document: its source, when it was retrieved, the facts parsed from it, passages."""

    def load(container: Container) -> StoredDocument:
        from workflow_agent.knowledge.store import KnowledgeBase

        with KnowledgeBase(container.config.knowledge_database, create=False) as base:
            return base.show(document_id)

    _report(config, output, load, _document_json, _show_document)


def _hit_json(hit: Hit) -> dict[str, Any]:
    return {**asdict(hit), "citation": hit.citation}


def _document_json(document: StoredDocument) -> dict[str, Any]:
    data = asdict(document)
    knowledge = data.pop("knowledge")
    return {**data, **knowledge}


def _show_added(document: StoredDocument) -> None:
    from rich.markup import escape

    from workflow_agent.cli.output import out

    k = document.knowledge
    verb = "added" if document.changed else "unchanged (same content already stored)"
    out.print(f"[bold green]{verb}:[/] document {document.id}, {escape(k.title)} "
              f"[dim]({escape(document.source)})[/]")
    out.print(f"  {len(k.passages)} passages, {len(k.commands)} commands, "
              f"{len(k.config_files)} config files, ports {list(k.ports) or '-'}, "
              f"services {list(k.services) or '-'}")
    out.print(f"  [dim]workflow-agent knowledge show {document.id}[/]")


def _show_hits(hits: list[Hit]) -> None:
    from rich.markup import escape

    from workflow_agent.cli.output import out

    if not hits:
        out.print("no passages match (add documentation with `workflow-agent knowledge add`)")
    for hit in hits:
        out.print(f"[bold]document {hit.document_id}[/] {escape(hit.title)} "
                  f"[dim]score {hit.score:.2f}  {escape(hit.citation)}[/]")
        text = " ".join(hit.text.split())
        out.print("  " + escape(text[:300] + (" …" if len(text) > 300 else "")))


def _show_document(document: StoredDocument) -> None:
    from rich.markup import escape

    from workflow_agent.cli.output import out

    k = document.knowledge
    out.print(f"[bold]{document.id}[/] {escape(k.title)}")
    out.print(f"source: {escape(document.source)} ({document.content_type}), retrieved "
              f"{document.retrieved_at}, sha256 {document.content_hash[:12]}"
              + (f", integration {document.integration}" if document.integration else ""))
    rows = [("platforms", ", ".join(k.platforms)), ("ports", ", ".join(map(str, k.ports))),
            ("services", ", ".join(k.services)),
            ("prerequisites", "\n".join(k.prerequisites)),
            ("config files", "\n".join(f"{c.path or '(file not named)'}: {', '.join(c.keys)}"
                                       for c in k.config_files)),
            ("verification", "\n".join(k.verification))]
    for label, value in rows:
        if value:
            out.print(f"[bold]{label}:[/]\n  " + escape(value).replace("\n", "\n  "))
    for language, commands in k.commands_by_language().items():
        out.print(f"[bold]{language} commands:[/]")
        for command in commands:
            where = " / ".join(p for p in (command.platform, command.section) if p)
            out.print(f"  [{command.purpose}] {escape(command.command)}  [dim]{escape(where)}[/]")
    out.print(f"[bold]sections:[/] {len(k.sections)}, [bold]passages:[/] {len(k.passages)}")
