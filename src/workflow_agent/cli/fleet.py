"""The fleet code path of ``install``/``verify``/``uninstall --inventory FILE``.

Reads the inventory, selects ``--limit`` hosts, asks once (unless ``--yes``), runs the
rollout (``fleet/rollout.py``) with live progress on stderr (one line per host with its
stage) and prints a summary table, or ``--output json`` with every host's result.
Heavy modules are imported inside the functions so ``--help`` stays fast.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from workflow_agent.fleet.inventory import Host
    from workflow_agent.fleet.plan import FleetTargets, RolloutOptions
    from workflow_agent.fleet.rollout import HostResult, RolloutReport
    from workflow_agent.state import Action

InventoryOpt = Annotated[Path | None, typer.Option(
    "--inventory", "-i", help="An Ansible inventory (YAML or INI): run on its hosts, each "
    "over SSH with its own user, port, key and jump host.")]
LimitOpt = Annotated[str | None, typer.Option(
    "--limit", "-l", metavar="PATTERN", help="Only these inventory hosts (Ansible patterns: "
    "group, host, web*, ~regex, a:b, a:&b, a:!b).")]
ForksOpt = Annotated[int, typer.Option("--forks", "-f", min=1, help="Hosts worked on at once.")]
SerialOpt = Annotated[str | None, typer.Option(
    "--serial", metavar="N|P%", help="Hosts per batch (a number, or a percentage of the "
    "hosts); a batch starts only when the previous one verified.")]
CanaryOpt = Annotated[int, typer.Option(
    "--canary", min=0, metavar="N", help="Run N hosts first, as a batch of their own.")]
MaxFailOpt = Annotated[str, typer.Option(
    "--max-fail", metavar="P%", help="Stop (and roll back the batch) when more than P% of a "
    "batch's reachable hosts fail; 0% (default): at the first failure.")]
RollbackAllOpt = Annotated[bool, typer.Option(
    "--rollback-all-on-failure", help="When the rollout stops, roll back every host it "
    "installed, not only the failed batch.")]

_MARK = {"pending": "[dim]·[/]", "running": "[cyan]…[/]", "succeeded": "[green]✓[/]",
         "failed": "[red]✗[/]", "unreachable": "[magenta]⚡[/]", "skipped": "[dim]-[/]"}
#: Distinct hints the summary shows under its table.
_HINTS = 5
_STYLE = {"succeeded": "green", "failed": "red", "unreachable": "magenta", "skipped": "dim",
          "running": "cyan", "pending": "dim"}


@dataclass(frozen=True)
class FleetArgs:
    """The fleet flags of one command."""

    inventory: Path
    limit: str | None = None
    forks: int = 5
    serial: str | None = None
    canary: int = 0
    max_fail: str = "0%"
    rollback_all: bool = False

    def options(self) -> RolloutOptions:
        """The rollout options these flags mean (``InvalidInputError`` when malformed)."""
        from workflow_agent.fleet.plan import BatchSize, RolloutOptions, parse_percent

        return RolloutOptions(
            forks=self.forks,
            serial=BatchSize.parse(self.serial) if self.serial is not None else None,
            canary=self.canary, max_fail=parse_percent(self.max_fail),
            rollback_all=self.rollback_all,
        )


def fleet_command(
    action: Action,
    integration: str,
    params: dict[str, str],
    fleet: FleetArgs,
    *,
    config: Path | None,
    json_output: bool,
    yes: bool,
    target: str | None = None,
    **overrides: Any,
) -> int:
    """Run ``action`` on the inventory's hosts; print progress and the result; the exit
    code. ``WorkflowAgentError`` (bad inventory, pattern, flags, declined) propagates."""
    from workflow_agent.cli.jsonout import emit_json
    from workflow_agent.config import load_configuration
    from workflow_agent.errors import InvalidInputError
    from workflow_agent.fleet.inventory import load_inventory
    from workflow_agent.fleet.plan import FleetTargets

    if target is not None:
        raise InvalidInputError("--target and --inventory exclude each other",
                                hint="Use --limit to pick inventory hosts.")
    options = fleet.options()
    hosts = load_inventory(fleet.inventory).select(fleet.limit or "all")
    _note_unused_passwords(hosts)
    targets = FleetTargets(load_configuration(config_file=config, **overrides), hosts)
    if action in ("install", "uninstall") and not yes:
        _confirm(action, integration, hosts, json_output)
    progress = FleetProgress(live=not json_output and sys.stderr.isatty(),
                             quiet=json_output)
    try:
        report = asyncio.run(_roll_out(targets, hosts, options, progress, action,
                                       integration, params))
    except KeyboardInterrupt:
        progress.stop()
        return interrupted(targets, progress, fleet.inventory, json_output)
    finally:
        progress.stop()
    targets.container.sync_history()
    if json_output:
        emit_json(report.as_json())
    else:
        show_report(report)
    return report.exit_code


async def _roll_out(targets: FleetTargets, hosts: list[Host], options: RolloutOptions,
                    progress: FleetProgress, action: Action, integration: str,
                    params: dict[str, str]) -> RolloutReport:
    """Connect the first batch while the workflow machinery loads, then roll out."""
    from workflow_agent.fleet.plan import plan_batches

    first = plan_batches(len(hosts), canary=options.canary, serial=options.serial)[0]
    targets.open_early(hosts[:min(first, options.forks)])
    try:
        # In a thread: the event loop meanwhile answers the hosts' SSH handshakes.
        await asyncio.to_thread(_import, "workflow_agent.agent", "workflow_agent.fleet.rollout")
        from workflow_agent.agent import WorkflowAgent
        from workflow_agent.fleet.rollout import Rollout

        rollout = Rollout(WorkflowAgent(targets.container), hosts, options,
                          on_update=progress.update)
        progress.start(rollout.results, rollout.fleet_id, action, integration)
        return await rollout.run(action, integration, params, dict(os.environ))
    finally:
        await targets.close_unused()


def interrupted(targets: FleetTargets, progress: FleetProgress, inventory: Path,
                json_output: bool) -> int:
    """After Ctrl-C: which hosts were left part-way through a change (their journals are
    unfinished: nothing undid them) and how to undo that; the exit code, 130."""
    from workflow_agent.cli.jsonout import emit_json

    left = {s.header.workflow_id for s in targets.container.journals.left_by(os.getpid())}
    changing = [h for h in progress.hosts if h.workflow_id in left]
    unstarted = sum(1 for h in progress.hosts if h.status == "pending")
    fleet = progress.fleet_id[:8]
    if json_output:
        emit_json({"fleet_id": progress.fleet_id, "interrupted": True, "exit_code": 130,
                   "hosts": [{**h.as_json(), "left_changing": h.workflow_id in left}
                             for h in progress.hosts]})
        return 130
    import shlex

    from rich.markup import escape

    from workflow_agent.cli.output import err

    names = _some([h.name for h in changing], 10)
    recover = f"workflow-agent recover --inventory {shlex.quote(str(inventory))}"
    err.print(f"[bold red]interrupted[/] (fleet {fleet}): "
              + (f"{len(changing)} host(s) were left part-way through the change "
                 f"({escape(names)}); nothing undid it. Run `{escape(recover)}` to roll "
                 "them back (--forks N at once). " if changing else
                 "no host was left part-way through a change. ")
              + (f"{unstarted} host(s) never started. " if unstarted else "")
              + f"`workflow-agent history --fleet {fleet}` shows every host's run.")
    return 130


def _show_plans(report: RolloutReport) -> None:
    """Each distinct set of scripts once: the hosts it is for, the method, the scripts
    with their validation findings."""
    from rich.markup import escape

    from workflow_agent.cli.output import out, show_scripts

    groups: dict[tuple[str, ...], list[str]] = {}
    for host in report.hosts:  # in inventory order
        state = report.plans.get(host.name)
        if state is not None:
            key = tuple(f"{action}:{script.sha256}" for action, script in state.scripts.items())
            groups.setdefault(key, []).append(host.name)
    for names in groups.values():
        first = report.plans[names[0]]
        shown = _some(names, 10)
        method = first.strategy.method if first.strategy else "no method"
        out.rule(f"[bold]{len(names)} host(s)[/]: {escape(shown)} (method {escape(method)})")
        show_scripts(first, out)


def _note_unused_passwords(hosts: list[Host]) -> None:
    """Say once which passwords of the inventory are not used, and what is instead."""
    from workflow_agent.fleet.inventory import Vaulted

    vaulted = [h.name for h in hosts if h.become and isinstance(h.become_password, Vaulted)]
    logins = [h.name for h in hosts if h.vars.get("ansible_password") is not None
              or h.vars.get("ansible_ssh_pass") is not None]
    if not vaulted and not logins:
        return
    from rich.markup import escape

    from workflow_agent.cli.output import err

    if vaulted:
        err.print(f"note: the sudo password the inventory gives {escape(_some(vaulted))} is "
                  "encrypted with Ansible Vault, which workflow-agent does not decrypt: "
                  "sudo's password comes from ssh.sudo_password_env, or a prompt on a "
                  "terminal.")
    if logins:
        err.print(f"note: the login password the inventory gives {escape(_some(logins))} "
                  "(ansible_password) is not used: workflow-agent logs in with keys "
                  "(ansible_ssh_private_key_file, ssh.client_keys) or the ssh-agent.")


def _some(names: list[str], shown: int = 5) -> str:
    """``names`` for a sentence: the first ``shown``, then how many more."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _import(*modules: str) -> None:
    for module in modules:
        importlib.import_module(module)


def _confirm(action: str, integration: str, hosts: list[Host], json_output: bool) -> None:
    """Ask once for the whole fleet; ``NotConfirmedError`` when declined or unaskable."""
    from workflow_agent.errors import NotConfirmedError

    names = _some([host.name for host in hosts], 10)
    if sys.stdin.isatty() and not json_output:
        from rich.prompt import Confirm

        if Confirm.ask(f"{action} {integration} on {len(hosts)} host(s) ({names})?"):
            return
    raise NotConfirmedError(
        f"{action} of {integration} on {len(hosts)} inventory host(s) was not confirmed; "
        "nothing was changed", hint="Pass --yes to confirm without a prompt.")


class FleetProgress:
    """Live progress on stderr: a table with one line per host and its stage on a
    terminal; elsewhere a line each time a host's stage or status changes."""

    def __init__(self, *, live: bool, quiet: bool = False) -> None:
        self.live = live
        self.quiet = quiet
        #: The rollout's hosts, as they stand (empty until it starts).
        self.hosts: list[HostResult] = []
        self.fleet_id = ""
        self._seen: dict[str, tuple[str, str]] = {}
        self._display: Any = None
        self._title = ""

    def start(self, hosts: list[HostResult], fleet_id: str, action: str,
              integration: str) -> None:
        """Show the hosts before anything runs."""
        self.hosts, self.fleet_id = hosts, fleet_id
        self._title = f"{action} {integration} on {len(hosts)} host(s), fleet {fleet_id}"
        if self.quiet:
            return
        from workflow_agent.cli.output import err

        if self.live:
            from rich.live import Live

            self._display = Live(self._table(), console=err, refresh_per_second=4)
            self._display.start()
        else:
            err.print(self._title)

    def update(self, host: HostResult) -> None:
        """A host's status or stage changed."""
        if self.quiet:
            return
        if self._display is not None:
            self._display.update(self._table())
            return
        key = (host.status, host.stage)
        if self._seen.get(host.name) == key:
            return
        self._seen[host.name] = key
        from rich.markup import escape

        from workflow_agent.cli.output import err

        took = f" {time.monotonic() - host.started:6.1f}s" if host.started else ""
        err.print(f"{_MARK[host.status]} {escape(host.name):<16} batch {host.batch} "
                  f"{host.status:<11} {escape(host.stage)}{took}")

    def stop(self) -> None:
        """End the live display (its last state stays on the terminal)."""
        if self._display is not None:
            self._display.update(self._table())
            self._display.stop()
            self._display = None

    def _table(self) -> Table:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=self._title, title_justify="left", box=None)
        for column in ("", "host", "batch", "status", "stage", "time"):
            table.add_column(column)
        now = time.monotonic()
        for host in self.hosts:
            took = host.duration if host.duration is not None else (
                now - host.started if host.started else None)
            table.add_row(_MARK[host.status], escape(host.name), str(host.batch),
                          f"[{_STYLE[host.status]}]{host.status}[/]", escape(host.stage),
                          "" if took is None else f"{took:.1f}s")
        return table


def show_report(report: RolloutReport) -> None:
    """The summary table of a finished rollout (stdout), and why it stopped; a plan's
    scripts first, each distinct one once, with the hosts it is for."""
    from rich.markup import escape
    from rich.table import Table

    from workflow_agent.cli.output import out

    if report.action == "plan":
        _show_plans(report)

    table = Table(title=f"{report.action} {report.integration}: fleet {report.fleet_id}",
                  title_justify="left")
    for column in ("host", "target", "batch", "status", "rolled back", "workflow", "detail"):
        table.add_column(column, overflow="fold")
    for host in report.hosts:
        rolled = "yes" if host.rolled_back else ("[red]failed[/]" if host.rollback_error
                                                 else "")
        detail = host.rollback_error or host.error or (
            f"ended at {host.stage}" if host.status != "succeeded" else "")
        table.add_row(escape(host.name), escape(host.target), str(host.batch),
                      f"[{_STYLE[host.status]}]{host.status}[/]", rolled,
                      (host.workflow_id or "")[:8], escape(detail))
    out.print(table)
    # What the errors say to do (or their script's last output), once per wording.
    hints: dict[str, list[str]] = {}
    for host in report.hosts:
        if host.hint and host.status in ("failed", "unreachable"):
            line = " / ".join(part.strip() for part in host.hint.splitlines() if part.strip())
            hints.setdefault(line[:300], []).append(host.name)
    for hint, names in list(hints.items())[:_HINTS]:
        out.print(f"[bold]{escape(_some(names))}:[/] {escape(hint)}")
    if len(hints) > _HINTS:
        out.print(f"[dim]{len(hints) - _HINTS} more: `workflow-agent show WORKFLOW` tells "
                  "each host's whole story[/]")
    counts = ", ".join(f"{report.count(s)} {s}" for s in
                       ("succeeded", "failed", "unreachable", "skipped") if report.count(s))
    out.print(f"{counts} in {report.duration:.1f}s  [dim](workflow-agent history --fleet "
              f"{report.fleet_id[:8]})[/]")
    if report.stopped:
        out.print(f"[bold red]stopped:[/] {escape(report.stopped)}")
