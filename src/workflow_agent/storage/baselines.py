"""The baseline index: the newest snapshot per (target, integration), one file each.

Whether an install takes a new baseline, and what an uninstall may remove, depends on
the baseline in force for the integration on the target: the newest row of the history
store's ``snapshots`` table. Reading that means importing SQLAlchemy and ingesting the
whole spool, a second and more for a fleet. So every baseline saved on this machine is
also written here, as ``<sha256 of target NUL integration>.json`` (the redacted values
the store keeps, with the snapshot's time), and the coordinator reads that file instead.

The index stands in for the store only once it is complete: the first ``HistoryStore``
opened with it copies the newest snapshot of every pair from the database, then writes
the ``.complete`` marker; until then readers ask the store. An entry is replaced only by
a newer snapshot (by time), so the spool writing it, the store replaying that event and
the store's copying may come in any order. A shared database (``history_url``) gets no
index: other machines save baselines there.

Standard library only: the coordinator reads this without loading the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from workflow_agent.errors import HistoryError

if TYPE_CHECKING:
    from workflow_agent.config import WorkflowConfiguration

#: Exists once the index holds every baseline of the local history database.
COMPLETE = ".complete"

_HINT = "Check that the data directory is writable and not full."


class BaselineIndex:
    """The newest snapshot per (target, integration) in ``directory``.

    Keys and content are the stored, already redacted values (as ``HistoryStore`` keeps
    them); callers redact lookup keys the same way. Write errors raise ``HistoryError``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def for_config(cls, config: WorkflowConfiguration) -> BaselineIndex | None:
        """This machine's index (``data_dir/baselines``), or ``None`` with a shared history
        database: other machines save baselines there, so only it knows the newest."""
        return None if config.history_url else cls(config.data_dir / "baselines")

    @property
    def complete(self) -> bool:
        """Whether the index holds every baseline of the history database."""
        return (self.directory / COMPLETE).exists()

    def latest(self, *, target: str, integration: str) -> str | None:
        """The newest snapshot content for the (redacted) pair, if any is indexed."""
        path = self._path(target, integration)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HistoryError(f"cannot read the baseline index entry {path}: {exc.strerror}",
                               hint=_HINT) from exc
        entry = _parse(raw)
        if entry is None:
            raise HistoryError(
                f"the baseline index entry {path} cannot be read",
                hint=f"Delete it and {self.directory / COMPLETE}: the next run rebuilds the "
                "index from the history database.",
            )
        return entry[1]

    def save(self, *, target: str, integration: str, content: str, at: datetime) -> None:
        """Index ``content``, taken at ``at`` (aware), unless a snapshot as new is in."""
        path = self._path(target, integration)
        entry = {"target": target, "integration": integration, "at": at.isoformat(),
                 "content": content}
        with self._errors(), self._locked():
            try:
                current = _parse(path.read_bytes())
            except FileNotFoundError:
                current = None
            # Equal times: the same snapshot again (the store replaying a spooled one).
            if current is not None and current[0] >= at:
                return
            _replace_durably(path, json.dumps(entry, ensure_ascii=False).encode())

    def mark_complete(self) -> None:
        """Record that the index now holds every baseline of the history database."""
        with self._errors(), self._locked():
            _replace_durably(self.directory / COMPLETE, b"")

    def _path(self, target: str, integration: str) -> Path:
        key = hashlib.sha256(f"{target}\0{integration}".encode()).hexdigest()
        return self.directory / f"{key}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Excludes other writers (threads and processes): compare, then replace."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise HistoryError(
                f"cannot write the baseline index {self.directory}: {exc.strerror}", hint=_HINT
            ) from exc


def _parse(raw: bytes) -> tuple[datetime, str] | None:
    """An entry's time and content, or ``None`` if damaged (only by hand: ``save`` renames
    each entry into place whole)."""
    try:
        entry = json.loads(raw)
        at, content = datetime.fromisoformat(entry["at"]), entry["content"]
    except (ValueError, TypeError, KeyError):
        return None
    return (at, content) if isinstance(content, str) and at.tzinfo is not None else None


def _replace_durably(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a synced temporary file renamed over it, and the
    rename synced too (so the entry cannot fall behind the spooled event it follows)."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    partial.replace(path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
