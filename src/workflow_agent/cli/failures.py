"""``workflow-agent failures``: what failure learning has learned.

Registered by ``cli/app.py`` with one line. Like every reporting command it goes through
``app._report``: errors become a message, a hint and the error's exit code, and
``--output json`` prints machine-readable rows.
"""

from __future__ import annotations

from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from workflow_agent.storage.failures import FailureEntry


class OutputFormat(StrEnum):
    """How results are printed (the same choices as every other command)."""

    text = "text"
    json = "json"


def failures(
    integration: Annotated[str | None, typer.Option(help="Only this integration.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML configuration file.")] = None,
    output: Annotated[OutputFormat, typer.Option(
        "--output", "-o", help="text or json.")] = OutputFormat.text,
) -> None:
    """Failures recognised so far: signature, how often, last seen, the fix, and whether
    the fix is proven (a later run applied it and succeeded)."""
    # app imports this module at start-up, so app's helpers are imported on use.
    from workflow_agent.cli import app

    app._report(config, app.OutputFormat(output.value),
                lambda c: c.history.list_failures(integration=integration),
                lambda rows: [_json(r) for r in rows], _show)


def _json(entry: FailureEntry) -> dict[str, Any]:
    return {**asdict(entry), "proven": entry.proven}


def _show(entries: list[FailureEntry]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from workflow_agent.cli.output import out

    if not entries:
        out.print("nothing learned yet: failed installs are analysed and remembered here")
        return
    table = Table("signature", "count", "last seen", "integration", "fix", "proven")
    for e in entries:
        fix = e.fix or "-"
        if e.fix and e.fix_applied:
            fix += f" ({e.fix_succeeded}/{e.fix_applied} worked)"
        table.add_row(escape(e.signature) + (f" [dim]{escape(e.subject)}[/]" if e.subject else ""),
                      str(e.count), f"{e.last_seen:%Y-%m-%d %H:%M:%S}", escape(e.integration),
                      escape(fix), "yes" if e.proven else "no")
    out.print(table)
    for e in entries:
        if e.llm_summary:
            out.print(f"[bold]{escape(e.signature)}[/] (LLM): {escape(e.llm_summary)}")
