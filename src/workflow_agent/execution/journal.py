"""The write-ahead change journal: what a workflow is about to change, saved before it does.

One folder per workflow, ``DATA_DIR/journal/WORKFLOW_ID/``, written on this machine;
what is read from the target to fill it is ``journal_probe``'s. Before an install (or
uninstall) script runs for real, ``Journal.record_prepared`` saves, durably:

* ``pre.json``: a snapshot of the integration's watched paths and of every path the
  rehearsal predicted would change: file types, modes, owners, hashes, the package set,
  users and groups;
* ``backup.tar``: the content, mode, owner, timestamps and extended attributes of every
  existing file and link the script may modify or delete (the tar made on the target);
* the processes running on the target, so the services the script starts or stops are
  known afterwards;
* ``journal.jsonl``: a header, one entry per backed-up path, then the ``executing``
  phase: only after that line is on disk does the script start.

After the script (succeeded or not), ``Journal.record_observed`` appends one entry per
change actually made: paths created, modified, deleted or re-permissioned (each marked
restorable or not: a modification the journal had no backup for cannot be undone),
packages, users, groups, processes started and stopped. The recovery manager
(``recovery/``) undoes entries newest first and appends what it did. The journal is
append-only and never rewritten; its folder stays until the user deletes it, so a failed
rollback can be retried.

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

Names are bytes on the target: a path or a command line that is not UTF-8 is held with
surrogate escapes (``surrogateescape``), and written to ``journal.jsonl`` and
``pre.json`` as JSON ``\\udcXX`` escapes (ASCII), read back as they were.

Durability: everything undoing needs (pre.json, backup.tar, the saved entries, the
process list, the index file) is fsynced, with the folders holding it, before the
``executing`` line, which is fsynced itself; a new journal's header is not, as nothing
depends on it before then. Writing blocks on fsync: the async paths do it in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticSerializationError

from workflow_agent.errors import HistoryError
from workflow_agent.storage.spool import append_durably
from workflow_agent.verification.snapshot import FileEntry, Snapshot

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

def printable(name: str) -> str:
    """``name`` for people (and for JSON that must be UTF-8): the bytes that are not
    UTF-8 (surrogate escapes) shown as ``\\xHH``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
        return f"{printable(name)} (pid {self.pid})"


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
        return f"{mark} {self.kind} {printable(self.name)} ({self.op}){extra}"


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
        index = _Index.open(self.directory.parent)
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
            # Found by target from now on: nothing is changed under a journal before this.
            _Index.by_target(self.directory.parent).add(self)
            self._write("pre.json", _snapshot_json(pre), sync=True)
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
        data = (self.directory / "pre.json").read_bytes()
        if b"\\ud" in data:  # escaped surrogates, which pydantic's JSON parser refuses
            return Snapshot.model_validate(json.loads(data))
        return Snapshot.model_validate_json(data)

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
        indexed = {workflow_id for _, workflow_id in _Index.open(self.directory).entries()}
        found = (self._summary(folder.name, folder.name in indexed)
                 for folder in self.directory.iterdir() if not folder.name.startswith("."))
        return sorted(filter(None, found), key=lambda summary: summary.header.created)

    def of_target(self, target_identity: str) -> list[JournalSummary]:
        """The journals of ``target_identity``, oldest first: only those the index of
        journals by target names are read (a rollback asks; a machine that manages a
        fleet keeps thousands)."""
        if not self.directory.is_dir():
            return []
        key = _target_key(target_identity)
        indexed = {workflow_id for _, workflow_id in _Index.open(self.directory).entries()}
        found = (self._summary(workflow_id, workflow_id in indexed) for entry_key, workflow_id
                 in _Index.by_target(self.directory).entries() if entry_key == key)
        return sorted((summary for summary in found if summary is not None
                       and summary.header.target_identity == target_identity),
                      key=lambda summary: summary.header.created)

    def _summary(self, workflow_id: str, indexed: bool) -> JournalSummary | None:
        """A journal's header and phase: from ``journal.jsonl`` while it is ``indexed``
        as open, else from its ``phase`` file; None for a folder that is not a journal
        (or is unreadable: `changes ID` reports it)."""
        folder = self.directory / workflow_id
        journal = Journal(folder)
        try:
            header = journal.header
            if indexed:
                phase = journal.phase
            else:
                phase = (folder / "phase").read_text().strip() if (
                    folder / "phase").exists() else "prepared"
        except (OSError, HistoryError):
            return None
        return JournalSummary(journal, header, phase)

    def left_by(self, pid: int) -> list[JournalSummary]:
        """The unfinished journals process ``pid`` created (say, on its way out after
        Ctrl-C), oldest first: only those the index of open journals names are read."""
        if not self.directory.is_dir():
            return []
        found = [summary for _, workflow_id in _Index.open(self.directory).entries()
                 if (summary := self._summary(workflow_id, True)) is not None
                 and summary.header.pid == pid and summary.unfinished]
        return sorted(found, key=lambda summary: summary.header.created)

    def unfinished(self, target_identity: str) -> list[JournalSummary]:
        """Journals of ``target_identity`` a crash left with changes not undone, oldest
        first: only those the index of open journals names are read."""
        if not self.directory.is_dir():
            return []
        key = _target_key(target_identity)
        found = []
        for entry_key, workflow_id in _Index.open(self.directory).entries():
            folder = self.directory / workflow_id
            if entry_key != key or not folder.is_dir():
                continue  # another target's, or deleted by hand with its changes
            journal = Journal(folder)
            summary = JournalSummary(journal, journal.header, journal.phase)
            if summary.unfinished and summary.header.target_identity == target_identity:
                found.append(summary)
        return sorted(found, key=lambda summary: summary.header.created)


class _Index:
    """A folder of the store holding an empty file ``KEY.WORKFLOW_ID`` per journal it
    names (KEY: ``_target_key`` of the journal's target), built by one scan of the store
    the first time it is needed (a data directory from before it), kept up by writers.

    ``.open/``: the journals that may be unfinished. It may name more: a journal whose
    prepare failed, or one a concurrent build saw open; readers check the phase.
    ``.by-target/``: every journal that got as far as ``record_prepared`` (one that did
    not changed nothing)."""

    def __init__(self, store: Path, name: str, keeps: Callable[[Journal], bool]) -> None:
        self.store = store
        self.directory = store / name
        self.keeps = keeps

    @classmethod
    def open(cls, store: Path) -> _Index:
        """The index of journals that may be unfinished."""
        return cls(store, ".open", lambda journal: journal.phase in UNFINISHED)

    @classmethod
    def by_target(cls, store: Path) -> _Index:
        """The index of every journal, by target."""
        return cls(store, ".by-target", lambda journal: bool(journal.header))

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
        journal."""
        if self.directory.is_dir():
            return
        self.store.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{self.directory.name}-", dir=self.store))
        for folder in self.store.iterdir():
            if folder.name.startswith("."):
                continue
            journal = Journal(folder)
            try:
                if self.keeps(journal):
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


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _unwritable(directory: Path, exc: OSError) -> HistoryError:
    return HistoryError(
        f"cannot write the change journal {directory}: {exc.strerror}",
        hint="Nothing was changed on the target. Check that the data directory is "
        "writable and not full.",
    )


def _lines(records: Iterable[dict[str, Any]]) -> bytes:
    # ASCII: names that are not UTF-8 (surrogate escapes) become \\udcXX escapes.
    return b"".join((json.dumps(record, default=str) + "\n").encode() for record in records)


def _snapshot_json(snapshot: Snapshot) -> bytes:
    """``snapshot`` as JSON, names that are not UTF-8 kept: pydantic's fast encoder
    refuses surrogate escapes in values and replaces them with U+FFFD in keys (file
    names), so then the json module's (slower) ASCII encoding is used instead."""
    with contextlib.suppress(PydanticSerializationError):  # a value holding one
        data = snapshot.model_dump_json()
        if "\ufffd" not in data:  # else a key held one
            return data.encode()
    return json.dumps(snapshot.model_dump()).encode()


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
