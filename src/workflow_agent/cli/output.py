"""Showing results to people (Rich); ``jsonout`` has the JSON for programs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from workflow_agent.agents.coordinator import StageEvent
    from workflow_agent.agents.execution import OutputLine
    from workflow_agent.execution.changes import ChangeSet
    from workflow_agent.execution.journal import JournalState
    from workflow_agent.integrations.registry import Integration
    from workflow_agent.state import WorkflowState
    from workflow_agent.storage.history import WorkflowRecord, WorkflowSummary

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

_STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "refused": "yellow",
    "running": "cyan",
    "incomplete": "magenta",
    "skipped": "dim",
}


def error(message: str, hint: str | None = None) -> None:
    """Print an error (and what to do about it) on stderr."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err.print(f"[dim]hint:[/] {escape(hint)}")


class Progress:
    """Live progress of a workflow: one line per finished stage, script output dimmed."""

    def __init__(self, *, verbose: bool) -> None:
        self.verbose = verbose

    async def on_stage(self, event: StageEvent) -> None:
        """A stage ended."""
        record = event.record
        mark = {"succeeded": "[green]✓[/]", "failed": "[red]✗[/]"}.get(record.status, "·")
        summary = _stage_summary(record.name, record.detail)
        err.print(f"{mark} {record.name:<18} [dim]{record.duration:6.2f}s[/] {escape(summary)}")

    async def on_output(self, line: OutputLine) -> None:
        """A script printed a line."""
        if self.verbose:
            err.print(f"  [dim]│ {escape(line.line)}[/]")


def _stage_summary(name: str, detail: dict[str, Any]) -> str:
    if "error" in detail:
        return ""
    if "skipped" in detail:
        return f"skipped: {detail['skipped']}"
    if name == "facts":
        return (f"{detail.get('distro')} {detail.get('distro_version')} {detail.get('arch')}, "
                f"{detail.get('package_manager')}, init {detail.get('init_system')}")
    if name == "validate":
        return str(detail.get("target", ""))
    if name == "strategy":
        return str(detail.get("reason", ""))
    if name == "script-validation":
        return f"{detail.get('errors', 0)} errors, {detail.get('warnings', 0)} warnings"
    if name == "rehearsal":
        return f"{detail.get('changes')} changes on a copy; the target is untouched"
    if name == "execute":
        return f"exit {detail.get('exit_code')}"
    if name == "verify":
        return ", ".join(detail.get("passed", []))
    if name == "baseline":
        return f"{detail.get('files')} files, {detail.get('packages')} packages recorded"
    if name == "proof":
        left = detail.get("leftovers", [])
        return "nothing left behind" if not left else f"{len(left)} left behind"
    return ""


def show_result(state: WorkflowState) -> None:
    """The end of a workflow, for people."""
    style = _STATUS_STYLE.get(state.status, "white")
    took = ""
    if state.finished_at is not None:
        took = f" in {(state.finished_at - state.started_at).total_seconds():.1f}s"
    out.print(
        f"[bold {style}]{state.action} {state.status}[/]: {state.integration} on "
        f"{escape(state.target_identity or state.target)}{took}  [dim]({state.workflow_id})[/]"
    )
    for check in state.checks:
        mark = "[green]✓[/]" if check.passed else "[red]✗[/]"
        out.print(f"  {mark} {escape(check.name)}: [dim]{escape(check.detail)}[/]")
    for line in state.leftovers:
        out.print(f"  [yellow]left behind:[/] {escape(line)}")
    if state.rollback is not None:
        report = state.rollback
        style = "green" if report.ok else "red"
        out.print(f"  [{style}]rollback ({report.strategy}):[/] {len(report.undone)} change(s) "
                  f"undone and verified in {report.duration:.1f}s")
        for problem in report.problems:
            out.print(f"  [red]not restored:[/] {escape(problem)}")
        for line in report.unrecorded:
            out.print(f"  [yellow]differs from before, not by this workflow:[/] {escape(line)}")
    for note in state.notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")
    if state.error is not None:
        error(state.error.message, state.error.hint)


def show_changes(changes: ChangeSet, console: Console = err) -> None:
    """A rehearsal's change set, diffs included."""
    console.rule("what the install changes (rehearsed on a copy)")
    for line in changes.lines():
        console.print(f"  {escape(line)}")
    for change in changes.files:
        if change.diff:
            console.print(f"[dim]{escape(change.diff.rstrip())}[/]")
    if changes.is_empty:
        console.print("  nothing")


def show_plan(state: WorkflowState) -> None:
    """Facts, strategy, scripts and findings of a plan."""
    if state.facts is not None:
        table = Table(title="Facts", show_header=False, title_justify="left")
        for key, value in state.facts.summary().items():
            table.add_row(key, escape(str(value)))
        table.add_row("installed packages", str(len(state.facts.installed_packages)))
        out.print(table)
    if state.strategy is not None:
        table = Table(title="Strategy", title_justify="left")
        for column in ("method", "compatible", "score", "why"):
            table.add_column(column)
        for score in state.strategy.scores:
            chosen = " (chosen)" if score.method == state.strategy.method else ""
            table.add_row(score.method + chosen, "yes" if score.compatible else "no",
                          f"{score.score:.3f}", escape("; ".join(score.reasons)))
        out.print(table)
    show_scripts(state, out)
    if state.rehearsal is not None:
        show_changes(state.rehearsal, out)
    show_result(state)


def show_scripts(state: WorkflowState, console: Console = out) -> None:
    """Each script with line numbers, where it came from, and its validation findings."""
    from rich.syntax import Syntax  # pygments: only plans and approvals highlight scripts

    for action, script in state.scripts.items():
        console.rule(f"{action} script ({script.template})")
        for origin in state.provenance.get(action, []):
            style = {"llm": "bold magenta", "documentation": "cyan"}.get(origin.kind, "dim")
            console.print(f"  [{style}]{origin.kind}[/] {escape(origin.source)}"
                          + (f" [dim]({escape(origin.detail)})[/]" if origin.detail else ""))
        console.print(Syntax(script.text, "bash", line_numbers=True, word_wrap=True))
        report = state.validation.get(action)
        if report is None:
            continue
        if not report.findings:
            console.print("[green]no validation findings[/]")
        for finding in report.findings:
            style = {"error": "red", "warning": "yellow"}.get(finding.severity, "dim")
            console.print(f"  [{style}]{finding.severity}[/] line {finding.line} "
                          f"[{finding.layer}] {finding.code}: {escape(finding.message)}")


def show_generated(state: WorkflowState, console: Console = err) -> None:
    """What a person reads before approving LLM-written scripts: each script with its
    provenance and findings, and what the rehearsal changed."""
    console.rule("[bold magenta]scripts written by an LLM: read them before approving[/]")
    show_scripts(state, console)
    if state.rehearsal is not None:
        show_changes(state.rehearsal, console)


def show_integrations(integrations: list[Integration]) -> None:
    """The integration list."""
    table = Table()
    for column in ("name", "version", "methods", "source", "description"):
        table.add_column(column)
    for item in integrations:
        d = item.definition
        table.add_row(d.name, d.version, ", ".join(m.name for m in d.methods), item.source,
                      d.description)
    out.print(table)


def show_integration(item: Integration) -> None:
    """One integration in detail."""
    d = item.definition
    out.print(f"[bold]{d.name}[/] {d.version}  [dim]{item.source}: {item.root}[/]")
    out.print(d.description)
    table = Table(title="Parameters", title_justify="left")
    for column in ("name", "type", "default", "required", "secret", "description"):
        table.add_column(column)
    for name, spec in d.parameters.items():
        table.add_row(name, spec.type, escape(repr(spec.default)), "yes" if spec.required else "",
                      f"yes (env {spec.env})" if spec.secret else "", escape(spec.description))
    out.print(table)
    out.print("[bold]Platforms:[/] " + "; ".join(
        f"{p.os_family} {'/'.join(p.distros) or 'any'}" for p in d.platforms))
    for method in d.methods:
        needs = ", ".join(f"{k}={v}" for k, v in method.requires.items()) or "nothing"
        out.print(f"[bold]Method {method.name}[/] (complexity {method.complexity}, "
                  f"security {method.security}; needs {escape(needs)}): {method.description}")
    out.print("[bold]Checks:[/]")
    for check in d.checks:
        out.print("  " + escape(", ".join(f"{k}={v}" for k, v in check.items())))
    u = d.uninstall
    out.print(f"[bold]Uninstall removes:[/] packages {u.packages}, paths {u.paths}, "
              f"users {u.users}, groups {u.groups}; compares {u.watch}")


def show_history(rows: list[WorkflowSummary]) -> None:
    """Recent workflows."""
    table = Table()
    for column in ("id", "started", "action", "integration", "target", "status", "took"):
        table.add_column(column)
    for row in rows:
        style = _STATUS_STYLE.get(row.status, "white")
        took = f"{row.duration:.1f}s" if row.duration is not None else ""
        table.add_row(row.id[:8], row.started_at.strftime("%Y-%m-%d %H:%M:%S"), row.action,
                      row.integration, escape(row.target), f"[{style}]{row.status}[/]", took)
    out.print(table)


def show_workflow(record: WorkflowRecord) -> None:
    """One workflow from history, with its stages and artifacts."""
    style = _STATUS_STYLE.get(record.status, "white")
    out.print(f"[bold]{record.id}[/] {record.action} {record.integration} on "
              f"{escape(record.target)}: [{style}]{record.status}[/]")
    out.print(f"params: {escape(json.dumps(record.params))}")
    if record.error:
        out.print(f"[red]error:[/] {escape(record.error)}")
    table = Table(title="Stages", title_justify="left")
    for column in ("stage", "status", "took", "detail"):
        table.add_column(column)
    for stage in record.stages:
        table.add_row(stage.name, stage.status, f"{stage.duration:.2f}s",
                      escape(json.dumps(stage.detail)[:200]))
    out.print(table)
    for artifact in record.artifacts:
        if artifact.kind in ("script", "output"):
            out.rule(f"{artifact.kind}: {artifact.name} ({artifact.stage})")
            out.print(escape(artifact.content.rstrip()))


def show_journal(state: JournalState) -> None:
    """A change journal: what was saved, what changed, what was undone."""
    header = state.header
    out.print(f"[bold]{header.action} {escape(header.integration)}[/] on "
              f"{escape(header.target_identity)}  [dim]({header.workflow_id})[/]")
    out.print(f"  phase: [bold]{state.phase}[/]  "
              + "  ".join(f"{phase} {str(at)[:19]}" for phase, at, _ in state.phases))
    out.print(f"  saved before the change: {state.saved} path(s)"
              + ("" if header.predicted else " (no rehearsal: configuration under /etc only)"))
    undone = {record.entry: record for record in state.undone}
    for entry in state.changes:
        record = undone.get(entry.id)
        mark = "" if record is None else (" [green]undone[/]" if record.ok else
                                          f" [red]not undone: {escape(record.detail)}[/]")
        out.print(f"  {entry.id:>4}  {escape(entry.describe())}{mark}")
    if not state.changes:
        out.print("  no changes observed" if state.observed else
                  "  changes not observed yet (interrupted): `workflow-agent recover` finds them")


def show_recovery(found: list[dict[str, Any]]) -> None:
    """What ``recover`` found and did."""
    if not found:
        out.print("nothing to recover: no interrupted workflow, no change left un-undone")
    for item in found:
        out.print(f"{item['workflow'][:8]} {escape(item['integration'])} on "
                  f"{escape(item['target'])} ({item['phase']}): {escape(item['result'])}")
        for problem in item.get("problems", []):
            out.print(f"  [red]{escape(problem)}[/]")
