"""The write-ahead change journal: what a workflow is about to change, saved before it does.

Before an install (or uninstall) script runs for real, the journal saves, on this
machine and durably (written, fsynced, directory fsynced):

* ``pre.json``: a snapshot of the integration's watched paths and of every path the
  rehearsal predicted would change: file types, modes, owners, hashes, the package set,
  users and groups;
* ``backup.tar``: the content, mode, owner, timestamps and extended attributes of every
  existing file and link the script may modify or delete: each one the rehearsal
  predicted, plus every file and link under ``/etc`` in the watched paths (configuration
  is where unpredicted edits hurt most, and it is small); made by ``tar`` on the target
  and fetched, so it works on any target that can run a script and hand back a file;
* the processes running on the target, so the services the script starts or stops are
  known afterwards;
* ``journal.jsonl``: a header, one entry per backed-up path, then the ``executing``
  phase: only after that line is on disk does the script start.

After the script (succeeded or not), ``observe`` compares a second snapshot and process
list with the first and appends one entry per change actually made: paths created,
modified, deleted or re-permissioned (each marked restorable or not: a modification the
journal had no backup for cannot be undone), packages, users, groups, processes started
and stopped. The recovery manager (``recovery/``) undoes entries newest first and
appends what it did. The journal is append-only and never rewritten; its folder stays
until the user deletes it, so a failed rollback can be retried.

A crash at any point leaves a journal whose last phase says how far it got:
``prepared`` (nothing changed yet), ``executing`` (the script may have changed anything
the journal knows how to restore), ``executed``, ``committed`` (the workflow succeeded),
``kept`` (it failed and the user chose to keep its changes), ``rolling-back``,
``rolled-back`` or ``rollback-failed``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shlex
import tarfile
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from workflow_agent.errors import ExecutionFailedError, HistoryError
from workflow_agent.execution.target import Target
from workflow_agent.storage.spool import append_durably
from workflow_agent.verification.snapshot import (
    DEFAULT_HASH_LIMIT,
    FileEntry,
    FileType,
    Snapshot,
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

    # -- writing ------------------------------------------------------------------------

    def append(self, *records: dict[str, Any]) -> None:
        """Append records, one line each, and make them durable (one fsync) before
        returning. A crash mid-write cuts at most the last line, which ``read`` drops."""
        data = b"".join((json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
                        for record in records)
        try:
            append_durably(self.directory / "journal.jsonl", data)
        except OSError as exc:
            raise HistoryError(
                f"cannot write the change journal {self.directory}: {exc.strerror}",
                hint="Nothing was changed on the target. Check that the data directory "
                "is writable and not full.",
            ) from exc

    def set_phase(self, phase: Phase, detail: str = "") -> None:
        """Record that the workflow reached ``phase`` (also in the ``phase`` file, which
        lets ``JournalStore`` list journals without reading them whole)."""
        self.append({"type": "phase", "phase": phase, "at": _now(), "detail": detail})
        self.write_file("phase", f"{phase}\n".encode())

    def add_entries(self, entries: Iterable[Entry]) -> None:
        """Append entries, durably."""
        self.append(*({"type": "entry", **entry.model_dump(mode="json")} for entry in entries))

    def add_undos(self, records: Iterable[UndoRecord]) -> None:
        """Record what undoing entries did, durably."""
        self.append(*({"type": "undo", **record.model_dump()} for record in records))

    def write_file(self, name: str, data: bytes) -> None:
        """Write ``name`` in the journal folder durably (file and folder fsynced)."""
        path = self.directory / name
        partial = path.with_suffix(path.suffix + ".partial")
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        _fsync_dir(self.directory)

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
        """A new journal folder holding only its header."""
        folder = self.directory / header.workflow_id
        folder.mkdir(parents=True, mode=0o700)
        _fsync_dir(self.directory)
        journal = Journal(folder)
        journal.append({"type": "header", **header.model_dump(mode="json")})
        return journal

    def get(self, workflow_id: str) -> Journal | None:
        """The journal of ``workflow_id`` (a unique prefix will do), if there is one."""
        if not self.directory.is_dir():
            return None
        matches = [p for p in self.directory.iterdir()
                   if p.name.startswith(workflow_id) and (p / "journal.jsonl").exists()]
        return Journal(matches[0]) if len(matches) == 1 else None

    def summaries(self) -> list[JournalSummary]:
        """Every journal's header and phase, oldest first, without reading them whole."""
        if not self.directory.is_dir():
            return []
        found = []
        for folder in self.directory.iterdir():
            try:
                with open(folder / "journal.jsonl", "rb") as handle:
                    first = json.loads(handle.readline())
                phase = (folder / "phase").read_text().strip() if (
                    folder / "phase").exists() else "prepared"
            except (OSError, ValueError):
                continue  # not a journal, or unreadable: `changes ID` reports it
            first.pop("type", None)
            found.append(JournalSummary(Journal(folder), Header.model_validate(first), phase))
        return sorted(found, key=lambda summary: summary.header.created)

    def unfinished(self, target_identity: str) -> list[JournalSummary]:
        """Journals of ``target_identity`` a crash left with changes not undone."""
        return [summary for summary in self.summaries()
                if summary.header.target_identity == target_identity and summary.unfinished]


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

# Saves the listed paths that exist into a tar on the target and prints its path.
# --no-recursion: a directory in the list stands for its own mode and owner only.
_BACKUP = """set -euo pipefail
dir=$(mktemp -d /var/tmp/workflow-agent-journal.XXXXXX)
chmod 700 "$dir"
: > "$dir/list"
for p in {paths}; do
  if [ -e "$p" ] || [ -L "$p" ]; then printf '%s\\0' "$p" >> "$dir/list"; fi
done
tar --create --file "$dir/backup.tar" --no-recursion --null --files-from "$dir/list" \\
  --absolute-names --numeric-owner --xattrs --acls --format=posix 2>"$dir/errors" || {{
  cat "$dir/errors" >&2; rm -rf -- "$dir"; exit 1; }}
printf '%s\\n' "$dir"
"""

#: The environment variable every journaled script runs with: the processes it starts
#: (and that do not clear their environment) can be told apart from everything else.
RUN_MARKER = "WORKFLOW_AGENT_RUN"

# Bash builtins only inside the loop (a busy host has hundreds of processes; a fork each
# would cost a second). Per process: pid, start time, uid, gid, unit, marked, argc, argv;
# then one `find` prints every process's exe and cwd link. NUL-separated throughout.
# Kernel threads (empty cmdline) and this script's own processes are left out.
_PROCESSES = r"""set -o pipefail
marker=%(marker)s
self=$$
{
links=()
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = "$self" ] && continue
  args=(); mapfile -d '' args < "$d/cmdline" 2>/dev/null || continue
  (( ${#args[@]} )) || continue
  read -r stat < "$d/stat" 2>/dev/null || continue
  read -r -a f <<< "${stat##*) }"
  [ "${f[1]}" = "$self" ] && continue
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


async def backup(target: Target, paths: Sequence[str], journal: Journal) -> list[Entry]:
    """Save ``paths`` (those that exist) from ``target`` into the journal's backup.tar.

    Returns one entry per saved path, with its state read from the archive itself.
    """
    if not paths:
        return []
    script = _BACKUP.format(paths=" ".join(shlex.quote(p) for p in paths))
    result = await target.run(script, timeout=300)
    if not result.ok:
        raise ExecutionFailedError(
            f"could not save the files the install will change on {target.identity}: "
            + " ".join(result.stderr.split())[-400:],
            hint="Nothing was changed on the target.",
        )
    remote = result.stdout.strip().splitlines()[-1]
    try:
        data = await target.get(f"{remote}/backup.tar")
    finally:
        await target.run(f"rm -rf -- {shlex.quote(remote)}\n", timeout=60)
    journal.write_file("backup.tar", data)
    entries = []
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for number, member in enumerate(archive.getmembers(), 1):
            entries.append(Entry(id=number, kind="file", op="modified",
                                 name="/" + member.name.lstrip("/"),
                                 before=_tar_entry(archive, member), backup=True))
    return entries


def backup_paths(pre: Snapshot, predicted: Iterable[str]) -> list[str]:
    """What to save before the change: the predicted paths and the configuration files."""
    chosen = set(predicted)
    chosen.update(path for path, entry in pre.files.items()
                  if path.startswith(CONFIG_ROOT) and entry.type in ("f", "l"))
    return sorted(chosen)


async def processes(target: Target, marker: str = "") -> list[ProcessInfo]:
    """The processes running on ``target`` (kernel threads left out); ``marker``
    (``NAME=VALUE``) flags those whose environment holds it."""
    result = await target.run(_PROCESSES % {"marker": shlex.quote(marker)}, timeout=60)
    if result.exit_code != 0:
        raise ExecutionFailedError(f"could not list the processes on {target.identity}: "
                                   + " ".join(result.stderr.split())[-300:])
    fields = [part.decode("utf-8", "surrogateescape")
              for part in base64.b64decode("".join(result.stdout.split())).split(b"\0")]
    records: list[list[str]] = []
    i = 0
    while i < len(fields) and fields[i] == "P":
        argc = int(fields[i + 9])
        records.append(fields[i + 1 : i + 10 + argc])
        i += 10 + argc
    if fields[i : i + 1] != ["L"] or "END" not in fields[i:]:
        raise ExecutionFailedError(f"the process list from {target.identity} is garbled")
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


async def snapshot(target: Target, header: Header) -> Snapshot:
    """Snapshot the journal's paths on ``target``."""
    return await take_snapshot(target, paths=header.paths, ignore=header.ignore)


async def observe(
    target: Target, journal: Journal, workflow_id: str,
    mask: Callable[[ProcessInfo], ProcessInfo] = lambda process: process,
) -> list[Entry]:
    """Append what the script actually changed (phase ``executed``); ``mask`` hides
    secrets in the command lines of processes before they are written."""
    state = journal.read()
    post = await snapshot(target, state.header)
    after = await processes(target, f"{RUN_MARKER}={workflow_id}")
    entries = observed(journal.pre_snapshot(), post, state.entries[: state.saved],
                       state.processes, [mask(p) for p in after],
                       first_id=len(state.entries) + 1)
    journal.add_entries(entries)
    journal.set_phase("executed")
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
