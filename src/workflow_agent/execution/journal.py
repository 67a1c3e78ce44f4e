"""The write-ahead change journal: what a workflow is about to change, saved before it does.

Before an install (or uninstall) script runs for real, ``prepare`` saves, on this
machine and durably, from ONE run on the target (``run_parts``):

* ``pre.json``: a snapshot of the integration's watched paths and of every path the
  rehearsal predicted would change: file types, modes, owners, hashes, the package set,
  users and groups;
* ``backup.tar``: the content, mode, owner, timestamps and extended attributes of every
  existing file and link the script may modify or delete: each one the rehearsal
  predicted, plus every file and link under ``/etc`` in the watched paths (configuration
  is where unpredicted edits hurt most, and it is small); made by ``tar`` on the target,
  which selects them itself (walking as the snapshot does) and streams the archive back
  base64 on standard output, so it works on any target that can run a script;
* the processes running on the target, so the services the script starts or stops are
  known afterwards;
* ``journal.jsonl``: a header, one entry per backed-up path, then the ``executing``
  phase: only after that line is on disk does the script start.

After the script (succeeded or not), ``observe`` compares a second snapshot and process
list (one run) with the first and appends one entry per change actually made: paths
created, modified, deleted or re-permissioned (each marked restorable or not: a
modification the journal had no backup for cannot be undone), packages, users, groups,
processes started and stopped. The recovery manager (``recovery/``) undoes entries
newest first and appends what it did. The journal is append-only and never rewritten;
its folder stays until the user deletes it, so a failed rollback can be retried.

A crash at any point leaves a journal whose last phase says how far it got:
``prepared`` (nothing changed yet), ``executing`` (the script may have changed anything
the journal knows how to restore), ``executed``, ``committed`` (the workflow succeeded),
``kept`` (it failed and the user chose to keep its changes), ``rolling-back``,
``rolled-back`` or ``rollback-failed``. The ``phase`` file beside each journal mirrors
the last one, so journals can be listed without reading them whole.

Which journals are unfinished is asked before every install, so it must not read every
journal ever written: ``DATA_DIR/journal/.open/`` holds an empty file per journal that
may be unfinished (``KEY.WORKFLOW_ID``, KEY naming the target). It is made durable
before an unfinished phase is, and removed after a finished one (``committed``, ``kept``,
``rolled-back``) is; while it is there, readers take the phase from ``journal.jsonl``,
not the ``phase`` file. Data directories from before the index get it built by one full
scan, the first time it is needed.

Durability: everything undoing needs (pre.json, backup.tar, the saved entries, the
process list, the index file) is fsynced, with the folders holding it, before the
``executing`` line, which is fsynced itself; a new journal's header is not, as nothing
depends on it before then. Writing blocks on fsync: the async paths do it in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import os
import shlex
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from workflow_agent.errors import ExecutionFailedError, HistoryError
from workflow_agent.execution.target import RunResult, Target, run_parts
from workflow_agent.storage.spool import append_durably
from workflow_agent.verification.snapshot import (
    DEFAULT_HASH_LIMIT,
    FileEntry,
    FileType,
    Snapshot,
    SnapshotProbe,
    decode,
    diff,
    take_snapshot,
)

Phase = Literal[
    "prepared", "executing", "executed", "committed", "kept",
    "rolling-back", "rolled-back", "rollback-failed",
]
#: Phases after which the target may hold changes nobody has undone or accepted.
UNFINISHED: frozenset[str] = frozenset({"executing", "executed", "rolling-back",
                                        "rollback-failed"})
EntryKind = Literal["file", "package", "user", "group", "process"]
Operation = Literal["created", "modified", "deleted", "metadata", "added", "removed",
                    "changed", "started", "stopped"]

_SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh", "mksh", "ash", "busybox"})

#: Configuration lives here: every file and link under it in the watched paths is saved.
CONFIG_ROOT = "/etc/"


class ProcessInfo(BaseModel):
    """A process on the target, enough to recognise it again and to start it again."""

    model_config = ConfigDict(frozen=True)

    pid: int
    start: str
    """Start time in clock ticks since boot: with the pid, names one process for good."""
    uid: int
    gid: int
    exe: str
    argv: list[str]
    cwd: str
    unit: str | None = None
    """The systemd unit whose cgroup holds it, if any."""
    marked: bool = False
    """Its environment carries the workflow's run marker: the script started it."""
    daemon: bool = False
    """Detached like a service: a child of PID 1, a session leader, or in a unit."""

    @property
    def key(self) -> tuple[int, str]:
        """The process's identity: pid numbers are reused, pid + start time are not."""
        return (self.pid, self.start)

    def describe(self) -> str:
        """``NAME (pid N)``."""
        name = os.path.basename(self.argv[0]) if self.argv else self.exe
        return f"{name} (pid {self.pid})"


class Entry(BaseModel):
    """One change, recorded before it happened (backups) or as observed afterwards."""

    model_config = ConfigDict(frozen=True)

    id: int
    kind: EntryKind
    op: Operation
    name: str
    """Path, package, user or group name, or process description."""
    before: FileEntry | None = None
    after: FileEntry | None = None
    backup: bool = False
    """The pre-change file is in ``backup.tar`` (so it can be put back exactly)."""
    restorable: bool = True
    version_before: str | None = None
    version_after: str | None = None
    line_before: str | None = None
    """For users and groups: the ``/etc/passwd`` or ``/etc/group`` line."""
    process: ProcessInfo | None = None

    def describe(self) -> str:
        """One line: ``~ file /etc/default/x (modified)``."""
        mark = {"created": "+", "added": "+", "started": "+", "deleted": "-", "removed": "-",
                "stopped": "-"}.get(self.op, "~")
        extra = ""
        if self.kind == "package":
            extra = " ".join(v for v in (self.version_before, self.version_after) if v)
            extra = f" {extra}" if extra else ""
        elif self.kind == "file" and not self.restorable:
            extra = " [no backup: cannot be restored]"
        return f"{mark} {self.kind} {self.name} ({self.op}){extra}"


class Header(BaseModel):
    """What the journal is about."""

    workflow_id: str
    action: str
    integration: str
    target: str
    """The target spec the workflow was given (reopened by ``recover``)."""
    target_identity: str
    paths: list[str]
    """The paths snapshotted before and after: watched plus predicted."""
    ignore: list[str]
    predicted: bool
    """Whether a rehearsal's change set said what to back up."""
    pid: int
    created: datetime


class UndoRecord(BaseModel):
    """What undoing one entry did."""

    entry: int
    ok: bool
    detail: str = ""


class JournalState(BaseModel):
    """A journal read back from disk."""

    header: Header
    entries: list[Entry] = Field(default_factory=list)
    """Backups saved before the change, then the changes observed after it."""
    saved: int = 0
    """How many of ``entries`` are the backups (written before ``executing``)."""
    phase: Phase = "prepared"
    phases: list[tuple[Phase, datetime, str]] = Field(default_factory=list)
    undone: list[UndoRecord] = Field(default_factory=list)
    processes: list[ProcessInfo] = Field(default_factory=list)

    @property
    def unfinished(self) -> bool:
        """True when the target may hold changes nobody has undone nor accepted."""
        return self.phase in UNFINISHED

    @property
    def changes(self) -> list[Entry]:
        """The changes the script made, as observed after it ran."""
        return self.entries[self.saved:]

    @property
    def observed(self) -> bool:
        """Whether the changes were observed (a crash mid-script leaves them unknown)."""
        return any(phase == "executed" for phase, _, _ in self.phases)


class Journal:
    """One workflow's journal folder: ``journal.jsonl``, ``pre.json``, ``backup.tar``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def workflow_id(self) -> str:
        """The folder is named after the workflow."""
        return self.directory.name

    @property
    def backup_path(self) -> Path:
        """The tar of the files saved before the change."""
        return self.directory / "backup.tar"

    @cached_property
    def header(self) -> Header:
        """What the journal is about (its first line only)."""
        try:
            with open(self.directory / "journal.jsonl", "rb") as handle:
                record = json.loads(handle.readline())
            if record.pop("type") != "header":
                raise ValueError("not a header")
            return Header.model_validate(record)
        except OSError as exc:
            raise HistoryError(f"cannot read the change journal {self.directory}: "
                               f"{exc.strerror}") from exc
        except (ValueError, KeyError, AttributeError):
            raise HistoryError(f"change journal {self.directory} has no header") from None

    @property
    def phase(self) -> str:
        """The last phase ``journal.jsonl`` records (``prepared`` before any): what the
        ``phase`` file mirrors, read from the end of the journal."""
        try:
            lines = (self.directory / "journal.jsonl").read_bytes().splitlines()
        except OSError as exc:
            raise HistoryError(f"cannot read the change journal {self.directory}: "
                               f"{exc.strerror}") from exc
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if record.get("type") == "phase":
                return str(record["phase"])
        return "prepared"

    # -- writing ------------------------------------------------------------------------

    def append(self, *records: dict[str, Any]) -> None:
        """Append records, one line each, and make them durable (one fsync) before
        returning. A crash mid-write cuts at most the last line, which ``read`` drops."""
        try:
            append_durably(self.directory / "journal.jsonl", _lines(records))
        except OSError as exc:
            raise _unwritable(self.directory, exc) from exc

    def set_phase(self, phase: Phase, detail: str = "") -> None:
        """Record that the workflow reached ``phase``, durably, and mirror it in the
        ``phase`` file. An unfinished phase is preceded by the journal's file in the
        index of open journals, a finished one followed by its removal."""
        index = _OpenIndex(self.directory.parent)
        unfinished = phase in UNFINISHED
        record = {"type": "phase", "phase": phase, "at": _now(), "detail": detail}
        try:
            if unfinished:
                index.add(self)
            append_durably(self.directory / "journal.jsonl", _lines([record]))
            # While indexed, the journal's phase is read from journal.jsonl: the mirror
            # must be durable only before the index stops pointing there.
            self._write("phase", f"{phase}\n".encode(), sync=not unfinished)
            if not unfinished:
                _fsync_dir(self.directory)
                index.remove(self)
        except OSError as exc:
            raise _unwritable(self.directory, exc) from exc

    def add_entries(self, entries: Iterable[Entry]) -> None:
        """Append entries, durably."""
        self.append(*_entry_records(entries))

    def add_undos(self, records: Iterable[UndoRecord]) -> None:
        """Record what undoing entries did, durably."""
        self.append(*({"type": "undo", **record.model_dump()} for record in records))

    def record_prepared(self, pre: Snapshot, backup: bytes | None, saved: Sequence[Entry],
                        processes: Sequence[ProcessInfo]) -> None:
        """Write what undoing needs (``pre.json``, ``backup.tar``, the saved entries, the
        processes), make it durable, then the ``executing`` phase: the write-ahead rule.

        Blocks on fsync: async code runs it in a thread.
        """
        try:
            self._write("pre.json", pre.model_dump_json().encode(), sync=True)
            if backup is not None:
                self._write("backup.tar", backup, sync=True)
            append_durably(self.directory / "journal.jsonl", _lines([
                *_entry_records(saved),
                {"type": "processes", "processes": [p.model_dump() for p in processes]},
            ]))
            # One fsync each for the names in the folder and the folder in the store.
            _fsync_dir(self.directory)
            _fsync_dir(self.directory.parent)
        except OSError as exc:
            raise _unwritable(self.directory, exc) from exc
        self.set_phase("executing")

    def record_observed(self, entries: Sequence[Entry]) -> None:
        """Append the changes observed after the script, then the ``executed`` phase.

        Blocks on fsync: async code runs it in a thread.
        """
        self.add_entries(entries)
        self.set_phase("executed")

    def _write(self, name: str, data: bytes, *, sync: bool) -> None:
        """Replace ``name`` in the journal folder atomically; with ``sync`` its bytes
        are on disk first (the folder's fsync, which makes the name durable, is the
        caller's)."""
        path = self.directory / name
        partial = path.with_suffix(path.suffix + ".partial")
        with open(partial, "wb") as handle:
            handle.write(data)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(partial, path)

    # -- reading ------------------------------------------------------------------------

    def read(self) -> JournalState:
        """The journal as recorded so far; ``HistoryError`` when it is unreadable."""
        try:
            lines = (self.directory / "journal.jsonl").read_text().splitlines()
        except OSError as exc:
            raise HistoryError(f"cannot read the change journal {self.directory}: "
                               f"{exc.strerror}") from exc
        state: JournalState | None = None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines):
                    break  # a line cut short by a crash: everything before it stands
                raise HistoryError(f"change journal {self.directory} is corrupt at line "
                                   f"{number}") from None
            kind = record.pop("type")
            if kind == "header":
                state = JournalState(header=Header.model_validate(record))
                continue
            if state is None:
                raise HistoryError(f"change journal {self.directory} has no header")
            if kind == "entry":
                state.entries.append(Entry.model_validate(record))
            elif kind == "phase":
                if record["phase"] == "executing":
                    state.saved = len(state.entries)
                state.phase = record["phase"]
                state.phases.append((record["phase"], record["at"], record.get("detail", "")))
            elif kind == "undo":
                state.undone.append(UndoRecord.model_validate(record))
            elif kind == "processes":
                state.processes = [ProcessInfo.model_validate(p) for p in record["processes"]]
        if state is None:
            raise HistoryError(f"change journal {self.directory} has no header")
        return state

    def pre_snapshot(self) -> Snapshot:
        """The snapshot taken before the change."""
        return Snapshot.model_validate_json((self.directory / "pre.json").read_bytes())

    def backup_members(self) -> dict[str, tarfile.TarInfo]:
        """The saved files by absolute path."""
        if not self.backup_path.exists():
            return {}
        with tarfile.open(self.backup_path) as archive:
            return {"/" + member.name.lstrip("/"): member for member in archive.getmembers()}


class JournalStore:
    """Every journal on this machine: ``DATA_DIR/journal/WORKFLOW_ID/``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def create(self, header: Header) -> Journal:
        """A new journal folder holding only its header (``record_prepared`` makes it
        durable, before anything depends on it)."""
        folder = self.directory / header.workflow_id
        folder.mkdir(parents=True, mode=0o700)
        journal = Journal(folder)
        try:
            (folder / "journal.jsonl").write_bytes(
                _lines([{"type": "header", **header.model_dump(mode="json")}]))
        except OSError as exc:
            raise _unwritable(folder, exc) from exc
        return journal

    def get(self, workflow_id: str) -> Journal | None:
        """The journal of ``workflow_id`` (a unique prefix will do), if there is one."""
        if not self.directory.is_dir():
            return None
        matches = [p for p in self.directory.iterdir()
                   if p.name.startswith(workflow_id) and (p / "journal.jsonl").exists()]
        return Journal(matches[0]) if len(matches) == 1 else None

    def summaries(self) -> list[JournalSummary]:
        """Every journal's header and phase, oldest first, without reading them whole
        (but those the index holds, whose phase comes from their journal)."""
        if not self.directory.is_dir():
            return []
        indexed = {workflow_id for _, workflow_id in _OpenIndex(self.directory).entries()}
        found = []
        for folder in self.directory.iterdir():
            if folder.name.startswith("."):
                continue
            journal = Journal(folder)
            try:
                header = journal.header
                if folder.name in indexed:
                    phase = journal.phase
                else:
                    phase = (folder / "phase").read_text().strip() if (
                        folder / "phase").exists() else "prepared"
            except (OSError, HistoryError):
                continue  # not a journal, or unreadable: `changes ID` reports it
            found.append(JournalSummary(journal, header, phase))
        return sorted(found, key=lambda summary: summary.header.created)

    def unfinished(self, target_identity: str) -> list[JournalSummary]:
        """Journals of ``target_identity`` a crash left with changes not undone, oldest
        first: only those the index of open journals names are read."""
        if not self.directory.is_dir():
            return []
        key = _target_key(target_identity)
        found = []
        for entry_key, workflow_id in _OpenIndex(self.directory).entries():
            folder = self.directory / workflow_id
            if entry_key != key or not folder.is_dir():
                continue  # another target's, or deleted by hand with its changes
            journal = Journal(folder)
            summary = JournalSummary(journal, journal.header, journal.phase)
            if summary.unfinished and summary.header.target_identity == target_identity:
                found.append(summary)
        return sorted(found, key=lambda summary: summary.header.created)


class _OpenIndex:
    """``STORE/.open/``: an empty file ``KEY.WORKFLOW_ID`` per journal that may be
    unfinished (KEY: ``_target_key`` of its target). It may name more: a journal whose
    prepare failed, or one a concurrent build saw open; readers check the phase."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.directory = store / ".open"

    def add(self, journal: Journal) -> None:
        """Name ``journal`` in the index, durably."""
        self.ensure()
        path = self.directory / _index_name(journal)
        if path.exists():
            return
        _create_durably(path)
        _fsync_dir(self.directory)

    def remove(self, journal: Journal) -> None:
        """Drop ``journal`` from the index (a crash may leave it: readers check)."""
        (self.directory / _index_name(journal)).unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, str]]:
        """``(target key, workflow id)`` of every journal the index names."""
        self.ensure()
        return [(key, workflow_id) for key, _, workflow_id
                in (name.partition(".") for name in os.listdir(self.directory))
                if key and workflow_id]

    def ensure(self) -> None:
        """Build the index if this data directory has none yet: one scan of every
        journal, their phases read from ``journal.jsonl``."""
        if self.directory.is_dir():
            return
        self.store.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".open-", dir=self.store))
        for folder in self.store.iterdir():
            if folder.name.startswith("."):
                continue
            journal = Journal(folder)
            try:
                if journal.phase in UNFINISHED:
                    _create_durably(scratch / _index_name(journal))
            except HistoryError:
                continue  # not a journal (no journal.jsonl, no header)
        _fsync_dir(scratch)
        try:
            # Renaming over an index another process built meanwhile fails unless it
            # is still empty; either way the one in place is complete.
            os.rename(scratch, self.directory)
        except OSError:
            shutil.rmtree(scratch)
        else:
            _fsync_dir(self.store)


def _target_key(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _index_name(journal: Journal) -> str:
    return f"{_target_key(journal.header.target_identity)}.{journal.workflow_id}"


class JournalSummary(NamedTuple):
    """A journal's header and last phase."""

    journal: Journal
    header: Header
    phase: str

    @property
    def unfinished(self) -> bool:
        """True when the target may hold changes nobody has undone nor accepted."""
        return self.phase in UNFINISHED


# -- on the target ------------------------------------------------------------------------

# Selects what backup_paths will expect, on the target itself (the configuration files
# walked as the snapshot walks them, the predicted paths that exist), and streams their
# tar. --no-recursion: a directory in the list stands for its own mode and owner only.
_BACKUP = r"""set -o pipefail
export LC_ALL=C
{walk}{{
  (( ${{#paths[@]}} )) && walk \( -type f -o -type l \) -print0
  for p in {predicted}; do
    if [ -e "$p" ] || [ -L "$p" ]; then printf '%s\0' "$p"; fi
  done
}} | sort -zu | tar --create --file - --no-recursion --null --files-from - \
  --absolute-names --numeric-owner --xattrs --acls --format=posix | base64 -w 4096
"""

#: The environment variable every journaled script runs with: the processes it starts
#: (and that do not clear their environment) can be told apart from everything else.
RUN_MARKER = "WORKFLOW_AGENT_RUN"

# Bash builtins only inside the loop (a busy host has hundreds of processes; a fork each
# would cost a second). Per process: pid, start time, uid, gid, unit, marked, argc, argv;
# then one `find` prints every process's exe and cwd link. NUL-separated throughout.
# Kernel threads (empty cmdline) and this script's own processes are left out: the
# script's shell ($$), the subshell it may run in (run_parts) and their children.
_PROCESSES = r"""set -o pipefail
marker=%(marker)s
self=$$ part=$BASHPID
{
links=()
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = "$self" ] && continue
  args=(); mapfile -d '' args < "$d/cmdline" 2>/dev/null || continue
  (( ${#args[@]} )) || continue
  read -r stat < "$d/stat" 2>/dev/null || continue
  read -r -a f <<< "${stat##*) }"
  [ "${f[1]}" = "$self" ] || [ "${f[1]}" = "$part" ] && continue
  uid="" gid=""
  while read -r key value _; do
    case $key in Uid:) uid=$value ;; Gid:) gid=$value; break ;; esac
  done < "$d/status" 2>/dev/null
  unit="" cg=""
  read -r cg < "$d/cgroup" 2>/dev/null
  case $cg in 0::*.service) unit=${cg##*/} ;; esac
  marked=0
  if [ -n "$marker" ]; then
    envs=(); mapfile -d '' envs < "$d/environ" 2>/dev/null
    for e in "${envs[@]}"; do [ "$e" = "$marker" ] && { marked=1; break; }; done
  fi
  links+=("$d/exe" "$d/cwd")
  printf 'P\0%%s\0%%s\0%%s\0%%s\0%%s\0%%s\0%%s\0%%s\0%%s\0' "$pid" "${f[19]}" "$uid" \
    "$gid" "$unit" "$marked" "${f[1]}" "${f[3]}" "${#args[@]}"
  printf '%%s\0' "${args[@]}"
done
printf 'L\0'
(( ${#links[@]} )) && find "${links[@]}" -maxdepth 0 -printf '%%p\0%%l\0' 2>/dev/null
printf 'END\0'
} | base64 -w 4096
"""


def backup_paths(pre: Snapshot, predicted: Iterable[str]) -> list[str]:
    """What to save before the change: the predicted paths and the configuration files."""
    chosen = set(predicted)
    chosen.update(path for path, entry in pre.files.items()
                  if path.startswith(CONFIG_ROOT) and entry.type in ("f", "l"))
    return sorted(chosen)


def _backup_script(probe: SnapshotProbe, predicted: Sequence[str]) -> str:
    """The script saving ``backup_paths(pre, predicted)`` for the ``pre`` that ``probe``
    takes, as a tar, base64 on stdout."""
    return _BACKUP.format(walk=probe.walk(CONFIG_ROOT),
                          predicted=" ".join(shlex.quote(p) for p in predicted) or "''")


def _saved(result: RunResult, pre: Snapshot, predicted: Sequence[str], where: str
           ) -> tuple[bytes | None, list[Entry]]:
    """The tar ``_backup_script`` printed (None when it holds nothing) and one entry per
    saved path, with its state read from the archive itself."""
    failed = f"could not save the files the install will change on {where}: "
    if not result.ok:
        raise ExecutionFailedError(failed + " ".join(result.stderr.split())[-400:],
                                   hint="Nothing was changed on the target.")
    try:
        data = base64.b64decode("".join(result.stdout.split()))
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            entries = [Entry(id=number, kind="file", op="modified",
                             name="/" + member.name.lstrip("/"),
                             before=_tar_entry(archive, member), backup=True)
                       for number, member in enumerate(archive.getmembers(), 1)]
    except (binascii.Error, tarfile.TarError) as exc:
        raise ExecutionFailedError(failed + f"the archive is garbled ({exc})",
                                   hint="Nothing was changed on the target.") from exc
    # Both lists were made in one run, a moment apart: a path the snapshot listed and
    # the tar lacks was deleted meanwhile, and can't be saved; sockets tar skips. A path
    # the tar holds and the snapshot lacks was created meanwhile: saved once too many.
    saved = {entry.name for entry in entries}
    missing = [path for path in backup_paths(pre, predicted)
               if path in pre.files and pre.files[path].type != "s" and path not in saved]
    if missing:
        raise ExecutionFailedError(
            failed + f"{', '.join(missing[:5])} vanished while being saved",
            hint="Nothing was changed on the target. Something else is changing it: "
            "try again once it is done.")
    return (data if entries else None), entries


def _processes_script(marker: str = "") -> str:
    """The script listing the processes on a target (kernel threads left out), flagging
    those whose environment holds ``marker`` (``NAME=VALUE``); base64 on stdout."""
    return _PROCESSES % {"marker": shlex.quote(marker)}


def _parse_processes(result: RunResult, where: str) -> list[ProcessInfo]:
    """The processes ``result`` (of ``_processes_script``, run on ``where``) lists."""
    if result.exit_code != 0:
        raise ExecutionFailedError(f"could not list the processes on {where}: "
                                   + " ".join(result.stderr.split())[-300:])
    fields = decode(result.stdout)
    records: list[list[str]] = []
    i = 0
    while i < len(fields) and fields[i] == "P":
        argc = int(fields[i + 9])
        records.append(fields[i + 1 : i + 10 + argc])
        i += 10 + argc
    if fields[i : i + 1] != ["L"] or "END" not in fields[i:]:
        raise ExecutionFailedError(f"the process list from {where} is garbled")
    end = fields.index("END", i)
    links = dict(zip(fields[i + 1 : end : 2], fields[i + 2 : end : 2], strict=False))
    found: list[ProcessInfo] = []
    for pid, start, uid, gid, unit, marked, ppid, session, _argc, *argv in records:
        if not (uid.isdigit() and gid.isdigit()):
            continue  # exited while it was read
        found.append(ProcessInfo(
            pid=int(pid), start=start, uid=int(uid), gid=int(gid),
            exe=links.get(f"/proc/{pid}/exe", ""), cwd=links.get(f"/proc/{pid}/cwd") or "/",
            argv=argv, unit=unit or None, marked=marked == "1",
            daemon=ppid in ("0", "1") or session == pid or bool(unit),
        ))
    return found


async def processes(target: Target, marker: str = "") -> list[ProcessInfo]:
    """The processes running on ``target`` (kernel threads left out); ``marker``
    (``NAME=VALUE``) flags those whose environment holds it."""
    result = await target.run(_processes_script(marker), timeout=60)
    return _parse_processes(result, target.identity)


async def snapshot(target: Target, header: Header) -> Snapshot:
    """Snapshot the journal's paths on ``target``."""
    return await take_snapshot(target, paths=header.paths, ignore=header.ignore)


async def prepare(
    target: Target, journal: Journal, predicted: Sequence[str] = (),
    mask: Callable[[ProcessInfo], ProcessInfo] = lambda process: process,
) -> list[Entry]:
    """Save what undoing ``journal``'s workflow needs, from one run on ``target``: the
    snapshot, the backups (``backup_paths``), the processes (``mask`` hides secrets in
    their command lines); then the ``executing`` phase. Returns the saved entries."""
    probe = SnapshotProbe.of(journal.header.paths, journal.header.ignore)
    listed, saving, running = await run_parts(
        target, [probe.script, _backup_script(probe, predicted), _processes_script()])
    pre = probe.parse(listed, target.identity)
    backup, saved = _saved(saving, pre, predicted, target.identity)
    before = [mask(p) for p in _parse_processes(running, target.identity)]
    await asyncio.to_thread(journal.record_prepared, pre, backup, saved, before)
    return saved


async def observe(
    target: Target, journal: Journal, workflow_id: str,
    mask: Callable[[ProcessInfo], ProcessInfo] = lambda process: process,
) -> list[Entry]:
    """Append what the script actually changed (phase ``executed``), from one run on
    ``target``; ``mask`` hides secrets in the command lines of processes before they
    are written."""
    state = journal.read()
    probe = SnapshotProbe.of(state.header.paths, state.header.ignore)
    listed, running = await run_parts(
        target, [probe.script, _processes_script(f"{RUN_MARKER}={workflow_id}")])
    post = probe.parse(listed, target.identity)
    after = _parse_processes(running, target.identity)
    entries = observed(journal.pre_snapshot(), post, state.entries[: state.saved],
                       state.processes, [mask(p) for p in after],
                       first_id=len(state.entries) + 1)
    await asyncio.to_thread(journal.record_observed, entries)
    return entries


def observed(
    pre: Snapshot,
    post: Snapshot,
    saved: Sequence[Entry],
    before: Sequence[ProcessInfo],
    after: Sequence[ProcessInfo],
    *,
    first_id: int,
) -> list[Entry]:
    """The changes actually made, as entries to append after the saved ones.

    A new process counts as started by the script when it carries the run marker or its
    program is a file the script created; an old process that is gone counts as stopped
    by it when the script started the same program again (a restart). Anything else
    coming and going on a busy host is none of the journal's business.
    """
    change = diff(pre, post)
    backed = {entry.name for entry in saved}
    entries: list[Entry] = []

    def add(**fields: Any) -> None:
        entries.append(Entry(id=first_id + len(entries), **fields))

    for path, entry in sorted(change.added.items()):
        add(kind="file", op="created", name=path, after=entry)
    for path, modified in sorted(change.modified.items()):
        op = "modified" if modified.content else "metadata"
        # Mode and owner can always be put back; bytes only from a backup.
        add(kind="file", op=op, name=path, before=modified.before, after=modified.after,
            backup=path in backed, restorable=path in backed or op == "metadata")
    for path, entry in sorted(change.removed.items()):
        add(kind="file", op="deleted", name=path, before=entry, backup=path in backed,
            restorable=path in backed or entry.type == "d")
    for kind in ("user", "group"):
        for name in sorted(getattr(change, f"{kind}s_added")):
            add(kind=kind, op="added", name=name)
        for name, line in sorted(getattr(change, f"{kind}s_removed").items()):
            add(kind=kind, op="removed", name=name, line_before=line)
        for name, (old, _new) in sorted(getattr(change, f"{kind}s_changed").items()):
            add(kind=kind, op="changed", name=name, line_before=old)
    for name, version in sorted(change.packages_added.items()):
        add(kind="package", op="added", name=name, version_after=version)
    for name, version in sorted(change.packages_removed.items()):
        add(kind="package", op="removed", name=name, version_before=version)
    for name, (old, new) in sorted(change.packages_changed.items()):
        add(kind="package", op="changed", name=name, version_before=old, version_after=new)
    was = {p.key for p in before}
    started = [p for p in after if p.key not in was and (p.marked or p.exe in change.added)]
    # A restart: a detached service gone, and the script started the same program, as
    # the same user, detached again. Shells never count: an unrelated login ending
    # while the script runs must not be "restarted" by a rollback.
    restarted = {(p.exe, p.uid) for p in started
                 if p.daemon and os.path.basename(p.exe) not in _SHELLS}
    still = {p.key for p in after}
    for process in before:
        if process.key not in still and process.daemon and (process.exe, process.uid) in restarted:
            add(kind="process", op="stopped", name=process.describe(), process=process)
    for process in started:
        add(kind="process", op="started", name=process.describe(), process=process)
    return entries


def _tar_entry(archive: tarfile.TarFile, member: tarfile.TarInfo) -> FileEntry:
    """The ``FileEntry`` of a saved path, as the snapshot would have recorded it."""
    kind: FileType = ("d" if member.isdir() else "l" if member.issym()
                      else "f" if member.isfile() else "c")
    sha256 = mtime = None
    if member.isfile():
        if member.size < DEFAULT_HASH_LIMIT:
            handle = archive.extractfile(member)
            assert handle is not None
            sha256 = hashlib.sha256(handle.read()).hexdigest()
        else:
            mtime = _mtime(member)
    return FileEntry.model_construct(
        type=kind, mode=member.mode & 0o7777, uid=member.uid, gid=member.gid,
        size=member.size, sha256=sha256, mtime=mtime,
        target=member.linkname if member.issym() else None,
    )


def _mtime(member: tarfile.TarInfo) -> str:
    """The modification time as ``find -printf %T@`` prints it (pax keeps nanoseconds)."""
    exact = member.pax_headers.get("mtime")
    if exact is None:
        return f"{int(member.mtime)}.0000000000"
    seconds, _, fraction = exact.partition(".")
    return f"{seconds}.{fraction.ljust(10, '0')[:10]}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _unwritable(directory: Path, exc: OSError) -> HistoryError:
    return HistoryError(
        f"cannot write the change journal {directory}: {exc.strerror}",
        hint="Nothing was changed on the target. Check that the data directory is "
        "writable and not full.",
    )


def _lines(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join((json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
                    for record in records)


def _entry_records(entries: Iterable[Entry]) -> Iterable[dict[str, Any]]:
    return ({"type": "entry", **entry.model_dump(mode="json")} for entry in entries)


def _create_durably(path: Path) -> None:
    """An empty file at ``path``, on disk (its folder's fsync is the caller's)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
