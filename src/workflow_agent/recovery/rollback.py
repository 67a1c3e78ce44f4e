"""Undo what a change journal recorded, then prove it was undone.

Entries are undone newest first, which the journal's order makes the safe order: the
processes the script started are stopped, the packages it added are purged (and removed
or changed ones put back at their old version), users and groups it added are deleted,
files it created are removed and files it modified or deleted are restored from the
backup (content, mode, owner, timestamps, extended attributes), and finally processes it
stopped are started again.

Each undo is then verified against the pre-change snapshot, read with the processes in
one run: a restored file must match its saved hash, mode and owner, a created one must
be gone, the package set and the users and groups must be as before. What could not be
restored is reported path by path; the journal and its backup stay as they are, so the
rollback can be retried. Names that are not UTF-8 reach the target byte for byte
(``quote``).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from workflow_agent.errors import InvalidInputError, RollbackRefusedError
from workflow_agent.execution.journal import (
    Entry,
    Journal,
    JournalState,
    JournalStore,
    UndoRecord,
    printable,
)
from workflow_agent.execution.journal_probe import read_state
from workflow_agent.execution.target import Target, quote
from workflow_agent.verification.snapshot import (
    FileEntry,
    Snapshot,
    compare,
    diff,
    take_snapshot,
)


class RollbackReport(BaseModel):
    """What a rollback undid, and what it could not."""

    strategy: str
    workflows: list[str]
    """The journals rolled back, newest first."""
    undone: list[str] = Field(default_factory=list)
    """One line per change undone and verified."""
    problems: list[str] = Field(default_factory=list)
    """One line per change not undone (or not verified), saying why."""
    unrecorded: list[str] = Field(default_factory=list)
    """Differences from the pre-change snapshot that no journal entry explains."""
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every selected change was undone and verified."""
        return not self.problems


@dataclass(frozen=True)
class Selection:
    """Entries of one journal to undo."""

    journal: Journal
    state: JournalState
    entries: list[Entry]


class RollbackStrategy(ABC):
    """Chooses which recorded changes to undo, in which journals."""

    name: str

    @abstractmethod
    def select(self, store: JournalStore, journal: Journal) -> list[Selection]:
        """The journals and entries to undo, newest journal first."""


class Staged(RollbackStrategy):
    """Undo one workflow's changes, keeping earlier workflows that verified.

    A workflow is a stage of the target's history with an integration: a failed
    reconfiguration goes back to the configuration that worked, not to nothing.
    """

    name = "staged"

    def select(self, store: JournalStore, journal: Journal) -> list[Selection]:
        """Every entry of ``journal``, once no later workflow built on it."""
        state = journal.read()
        _refuse_if_later(store, state, self.name)
        return [Selection(journal, state, state.changes)]


class Full(RollbackStrategy):
    """Undo this workflow and every earlier one of the same integration on the same
    target that is still in force: back to before the integration first came."""

    name = "full"

    def select(self, store: JournalStore, journal: Journal) -> list[Selection]:
        """``journal`` and its predecessors, newest first."""
        state = journal.read()
        _refuse_if_later(store, state, self.name)
        chain = [Selection(journal, state, state.changes)]
        for other in reversed(store.of_target(state.header.target_identity)):
            header = other.header
            if (header.created < state.header.created
                    and header.integration == state.header.integration
                    and other.phase in ("committed", "kept", "executed")):
                earlier = other.journal.read()
                chain.append(Selection(other.journal, earlier, earlier.changes))
        return chain


class PerChange(RollbackStrategy):
    """Undo only the chosen entries of one workflow."""

    name = "change"

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = set(ids)

    def select(self, store: JournalStore, journal: Journal) -> list[Selection]:
        """The entries of ``journal`` with the chosen ids."""
        state = journal.read()
        known = {entry.id for entry in state.changes}
        unknown = sorted(self.ids - known)
        if unknown:
            raise InvalidInputError(
                f"workflow {state.header.workflow_id[:8]} has no change(s) "
                + ", ".join(map(str, unknown)),
                hint=f"List them with: workflow-agent changes {state.header.workflow_id[:8]}",
            )
        return [Selection(journal, state, [e for e in state.changes if e.id in self.ids])]


def strategy_named(name: str, ids: Sequence[int] = ()) -> RollbackStrategy:
    """The strategy called ``name`` (``full``, ``staged`` or ``change``)."""
    if name == "change" or ids:
        if not ids:
            raise InvalidInputError("the per-change strategy needs the changes to undo",
                                    hint="Pass --change N (repeatable); see `changes`.")
        return PerChange(ids)
    if name == "full":
        return Full()
    if name == "staged":
        return Staged()
    raise InvalidInputError(f"unknown rollback strategy {name!r}",
                            hint="Use full, staged or change.")


def _refuse_if_later(store: JournalStore, state: JournalState, strategy: str) -> None:
    later = [other for other in store.of_target(state.header.target_identity)
             if other.header.created > state.header.created
             and other.header.integration == state.header.integration
             and other.phase in ("committed", "kept", "executed", "executing")]
    if later:
        ids = ", ".join(other.header.workflow_id[:8] for other in later)
        raise InvalidInputError(
            f"later workflow(s) {ids} changed {state.header.integration} on "
            f"{state.header.target_identity} after {state.header.workflow_id[:8]}; a "
            f"{strategy} rollback of it would undo changes under theirs",
            hint=f"Roll back the latest one first, or all of them with: workflow-agent "
            f"rollback {later[-1].header.workflow_id[:8]} --strategy full",
        )


async def roll_back(target: Target, selections: Sequence[Selection], strategy: str, *,
                    check_drift: bool = False) -> RollbackReport:
    """Undo each selection (newest journal first) on ``target`` and verify it.

    With ``check_drift``, a file the install left that has changed since (a user's edit)
    is not overwritten: ``RollbackRefusedError`` lists them instead.
    """
    started = time.monotonic()
    report = RollbackReport(strategy=strategy,
                            workflows=[s.state.header.workflow_id for s in selections])
    whole = strategy != "change"
    for selection in selections:
        journal = selection.journal
        # A retry follows a partial undo: what changed since is the rollback's own doing.
        if check_drift and not any(phase.startswith("roll")
                                   for phase, _, _ in selection.state.phases):
            await _refuse_drift(target, selection)
        await asyncio.to_thread(journal.set_phase, "rolling-back",
                                f"{strategy}: {len(selection.entries)} change(s)")
        failures, output = await _undo(target, journal, selection.entries)
        pre = journal.pre_snapshot()
        post, now = await read_state(target, selection.state.header, since=pre)
        alive, running = {p.key for p in now}, {p.exe for p in now}
        records = []
        for entry in sorted(selection.entries, key=lambda e: -e.id):
            failed = failures.get(entry.id) or _verify(entry, pre, post, alive, running)
            records.append(UndoRecord(entry=entry.id, ok=failed is None, detail=failed or ""))
            line = f"{entry.id}: {entry.describe()}"
            if failed:
                report.problems.append(f"{line}: {failed}")
            else:
                report.undone.append(line)
        await asyncio.to_thread(journal.add_undos, records)
        if report.problems and output:
            report.problems.append(f"undo output: {output}")
        if whole:
            report.unrecorded += _unrecorded(pre, post, selection.entries)
        await asyncio.to_thread(
            journal.set_phase, "rolled-back" if not report.problems else "rollback-failed",
            "; ".join(report.problems)[:2000])
        if report.problems:
            break  # an earlier journal's pre-state assumes this one was undone
    report.duration = time.monotonic() - started
    return report


async def _undo(target: Target, journal: Journal, entries: Sequence[Entry]
                ) -> tuple[dict[int, str], str]:
    """Run the undo script; returns why entries could not even be tried (by id), and
    the script's output tail when it reported a failure."""
    members = journal.backup_members()
    failures: dict[int, str] = {}
    restore: list[str] = []
    steps: list[str] = []
    newest_first = sorted(entries, key=lambda e: -e.id)
    # Stop what the script started before touching the files it runs from.
    for entry in newest_first:
        if entry.kind == "process" and entry.op == "started" and entry.process:
            steps.append(_STOP.format(pid=entry.process.pid,
                                      start=quote(entry.process.start)))
    purge = [e.name for e in newest_first if e.kind == "package" and e.op == "added"]
    if purge:
        steps.append(_PURGE.format(names=" ".join(quote(n) for n in purge)))
    back = [f"{e.name}={e.version_before}" for e in newest_first
            if e.kind == "package" and e.op in ("removed", "changed") and e.version_before]
    if back:
        steps.append(_REINSTALL.format(specs=" ".join(quote(s) for s in back)))
    for entry in newest_first:
        if entry.kind in ("user", "group") and entry.op == "added":
            command = "userdel" if entry.kind == "user" else "groupdel"
            getent = "passwd" if entry.kind == "user" else "group"
            steps.append(f"if getent {getent} {quote(entry.name)} >/dev/null; then "
                         f"{command} {quote(entry.name)} || true; fi")
    created = [e for e in newest_first if e.kind == "file" and e.op == "created"]
    # Files and links first, then directories deepest first (rmdir only empties).
    for entry in created:
        if entry.after is None or entry.after.type != "d":
            steps.append(f"rm -f -- {quote(entry.name)}")
    for entry in sorted((e for e in created if e.after and e.after.type == "d"),
                        key=lambda e: -e.name.count("/")):
        steps.append(f"rmdir -- {quote(entry.name)} 2>/dev/null || true")
    for entry in newest_first:
        if entry.kind != "file" or entry.op == "created":
            continue
        if entry.name in members:
            restore.append(entry.name)
        elif entry.before is not None and entry.op == "metadata":
            steps.append(_chmod(entry.name, entry.before))
        elif entry.before is not None and entry.op == "deleted" and entry.before.type == "d":
            steps.append(f"mkdir -p -- {quote(entry.name)} && "
                         + _chmod(entry.name, entry.before))
        elif entry.backup:
            failures[entry.id] = "its backup is missing from the journal's backup.tar"
        else:
            failures[entry.id] = ("it was changed without a backup (no rehearsal predicted "
                                  "it): restore it by hand")
    remote_tar = None
    if restore:
        if not journal.backup_path.exists():
            for entry in newest_first:
                if entry.name in restore:
                    failures[entry.id] = f"the backup {journal.backup_path} is gone"
            restore = []
        else:
            remote_tar = f"/var/tmp/workflow-agent-restore-{journal.workflow_id}.tar"
            await target.put(remote_tar, journal.backup_path.read_bytes(), mode=0o600)
            listed = " ".join(quote(path) for path in restore)
            steps.append(_RESTORE.format(tar=quote(remote_tar), paths=listed))
    for entry in newest_first:
        if entry.kind == "process" and entry.op == "stopped" and entry.process:
            steps.append(_start(entry))
    if not steps:
        return failures, ""
    script = "set -uo pipefail\nfailed=0\n" + "\n".join(steps) + "\n"
    if remote_tar:
        script += f"rm -f -- {quote(remote_tar)}\n"
    result = await target.run(script + "exit $failed\n", timeout=900)
    # Verification decides what is still wrong; the output only explains it.
    tail = "" if result.ok else " ".join((result.stdout + result.stderr).split())[-600:]
    return failures, tail


_STOP = """if [ -r /proc/{pid}/stat ] && \\
   [ "$(cut -d' ' -f22 < /proc/{pid}/stat 2>/dev/null)" = {start} ]; then
  kill -TERM {pid} 2>/dev/null
  for _ in $(seq 50); do kill -0 {pid} 2>/dev/null || break; sleep 0.1; done
  kill -KILL {pid} 2>/dev/null || true
fi"""

_PURGE = """if command -v apt-get >/dev/null; then
  apt-get purge -y -q {names} || failed=1
else
  dpkg --purge {names} || failed=1
fi"""

_REINSTALL = """apt-get install -y -q --allow-downgrades --no-install-recommends {specs} \\
  || failed=1"""

_RESTORE = """tar --extract --file {tar} --absolute-names --same-owner --same-permissions \\
  --numeric-owner --xattrs --acls --overwrite -- {paths} || failed=1"""


def _chmod(path: str, entry: FileEntry) -> str:
    quoted = quote(path)
    return (f"chown -h {entry.uid}:{entry.gid} -- {quoted} && "
            f"{{ [ -L {quoted} ] || chmod {entry.mode:04o} -- {quoted}; }} || failed=1")


def _start(entry: Entry) -> str:
    """Start a stopped process again: through its systemd unit, or as it ran."""
    process = entry.process
    assert process is not None
    direct = (f"( cd {quote(process.cwd)} 2>/dev/null || cd /; "
              f"setsid setpriv --reuid={process.uid} --regid={process.gid} --clear-groups "
              f"-- {quote(process.exe)} "
              + " ".join(quote(a) for a in process.argv[1:])
              + " </dev/null >/dev/null 2>&1 & )")
    if process.unit:
        unit = quote(process.unit)
        return (f"if [ -d /run/systemd/system ]; then systemctl start {unit} || failed=1; "
                f"else {direct}; fi")
    return direct


def _verify(entry: Entry, pre: Snapshot, post: Snapshot, alive: set[tuple[int, str]],
            running: set[str]) -> str | None:
    """Why ``entry`` is not undone on the target now, or None when it is."""
    if entry.kind == "file":
        before, now = pre.files.get(entry.name), post.files.get(entry.name)
        if before is None:
            return None if now is None else "still present"
        if now is None:
            return "still missing"
        change = compare(before, now)
        if change is None:
            return None
        content = []
        if change.content:
            content.append(f"type {now.kind} instead of {before.kind}" if before.type != now.type
                           else f"points to {now.target} instead of {before.target}"
                           if now.type == "l" else "content differs from the saved copy")
        return "; ".join(content + change.metadata)
    if entry.kind == "package":
        was, now_version = pre.packages.get(entry.name), post.packages.get(entry.name)
        if was == now_version:
            return None
        return f"installed version {now_version or 'none'}, before {was or 'none'}"
    if entry.kind in ("user", "group"):
        accounts = "users" if entry.kind == "user" else "groups"
        was_line = getattr(pre, accounts).get(entry.name)
        now_line = getattr(post, accounts).get(entry.name)
        return None if was_line == now_line else f"{entry.kind} line differs from before"
    if entry.process is not None:
        if entry.op == "started":
            return "still running" if entry.process.key in alive else None
        return None if entry.process.exe in running else "not running again"
    return None


async def _refuse_drift(target: Target, selection: Selection) -> None:
    """Refuse to undo changes whose result was changed again since the workflow ran."""
    header = selection.state.header
    now = await take_snapshot(target, paths=header.paths, ignore=header.ignore)
    changed = []
    for entry in selection.entries:
        if entry.kind != "file" or entry.after is None:
            continue
        current = now.files.get(entry.name)
        if current is None or compare(entry.after, current) is not None:
            changed.append(printable(entry.name))
    if changed:
        workflow = selection.state.header.workflow_id[:8]
        raise RollbackRefusedError(
            f"{len(changed)} path(s) changed since workflow {workflow} made them; undoing it "
            "would overwrite that: " + ", ".join(changed[:10]),
            hint=f"Check them (`workflow-agent changes {workflow}`), then run the rollback "
            "again with --force to restore the pre-install state anyway, or undo only "
            "other changes with --change N.",
        )


def _unrecorded(pre: Snapshot, post: Snapshot, entries: Sequence[Entry]) -> list[str]:
    """What still differs from the pre-change snapshot that no entry is about: changes
    made by something else since (or by the script, where the journal could not see)."""
    names = {(e.kind, e.name) for e in entries}
    change = diff(pre, post)
    out = [f"{mark} {printable(path)}" for mark, paths in
           (("+", change.added), ("-", change.removed), ("~", change.modified))
           for path in sorted(paths) if ("file", path) not in names]
    for mark, packages in (("+", change.packages_added), ("-", change.packages_removed),
                           ("~", change.packages_changed)):
        out += [f"{mark} package {n}" for n in sorted(packages) if ("package", n) not in names]
    for kind in ("user", "group"):
        for mark, op in (("+", "added"), ("-", "removed"), ("~", "changed")):
            out += [f"{mark} {kind} {n}" for n in sorted(getattr(change, f"{kind}s_{op}"))
                    if (kind, n) not in names]
    return out
