"""The write side of the history for a run: durable event files, ingested into the store.

Writing. A process appends each history write (start, stage, checkpoint, artifact,
snapshot, failure, finish) as one JSON line to its spool file, ``<time>-<uuid>.jsonl`` in
the spool folder, shared by all the workflows it runs. That needs only the standard
library, so recording a run costs no SQLAlchemy import (about 0.15 s of start-up, measured
in bench/rerun.py). Secrets are masked before anything reaches the disk.

One writer thread per spool puts the lines on disk, a batch at a time (group commit): it
takes every line queued so far, appends them with one write, fsyncs once, writes the
baseline index entry of a snapshot (``baselines.py``), and only then reports those lines
written. A write made from a coroutine queues its line and returns; the coroutine then
awaits ``durable(workflow_id)`` (the recorder does after each event), so the event loop
never waits for a disk, and the workflows of a fleet share each write and fsync. A write
made from plain code returns once its line is on disk. Either way a workflow goes past
an event only once it is on disk, and a write that failed (disk full, unwritable) reaches
the workflows whose lines it held as ``HistoryError``. A line is never split: only the
writer thread appends to the file, and a failed append is cut back to its last whole line.

Ingesting. ``HistoryStore`` ingests the files whenever it is opened or read (one reader at
a time per spool folder), so every reader sees every run, finished or not; a run killed
outright leaves its lines, which are ingested like any other and whose dead process marks
the workflow incomplete. A file's new lines go into the store in one transaction, together
with how many of its lines the store now holds (``spool_progress``), so whatever crashes
when, every event goes in exactly once. A file is deleted once every workflow started in
it has finished and all of it is in (and its count after that); the writer, finding its
file gone, starts a new one. A file whose writer is gone from this host (killed outright)
gets no more lines: it is deleted once all of it is in (its unfinished workflows read as
``incomplete``), where it used to be read again by every ingest for ever. Deleting takes
the file's lock exclusively, appending shares it, so no line is ever deleted before it
was taken in. (Older versions wrote a file per
workflow and kept its count in a sibling ``.applied`` file; such files are taken in the
same way, the count honoured while the store has none.)

LLM usage events are the exception: each is a whole file of its own
(``llm-usage-*.jsonl``, renamed into place complete, before the call returns: the call
took far longer than the fsync), since a call may serve no workflow or come after its
end; such a file is deleted as soon as it is in.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from workflow_agent.errors import HistoryError
from workflow_agent.secrets import Redactor
from workflow_agent.storage.baselines import BaselineIndex
from workflow_agent.storage.records import pid_alive

if TYPE_CHECKING:
    from workflow_agent.storage.history import HistoryStore

#: Name prefix of the one-event files that hold LLM usage.
LLM_USAGE_PREFIX = "llm-usage-"

_WRITE_HINT = "Check that the data directory is writable and not full."
#: The count an older version kept beside a spool file, in place of ``spool_progress``.
_LEGACY_COUNT = ".applied"
#: How the lines of a workflow's start and end begin (see ``HistorySpool._event``).
_STARTED = b'{"op": "start_workflow"'
_FINISHED = b'{"op": "finish_workflow"'


@dataclass(frozen=True)
class Origin:
    """Who wrote a spooled event, and when: replayed into the store as it happened."""

    pid: int
    host: str
    at: datetime


class HistoryWriter(Protocol):
    """What records history: the store itself, or a spool in front of it.

    The spool may only queue a write made from a coroutine: ``await durable(workflow_id)``
    before the workflow goes past it.
    """

    def start_workflow(
        self, *, workflow_id: str, action: str, integration: str, target: str,
        params: Mapping[str, object], fleet_id: str | None = None,
    ) -> None: ...

    def set_params(self, workflow_id: str, *, params: Mapping[str, object]) -> None: ...

    def record_stage(
        self, workflow_id: str, *, name: str, status: str, started_at: datetime,
        finished_at: datetime, detail: Mapping[str, object] | None = None,
    ) -> None: ...

    def checkpoint(self, workflow_id: str, *, stage: str, state_json: str) -> None: ...

    def add_artifact(
        self, workflow_id: str, *, stage: str, kind: str, name: str, content: str
    ) -> None: ...

    def save_snapshot(
        self, *, target: str, integration: str, workflow_id: str, content: str
    ) -> None: ...

    def finish_workflow(
        self, workflow_id: str, *, status: str, error: str | None = None,
        exit_code: int | None = None,
    ) -> None: ...

    def record_failure(
        self, *, workflow_id: str, integration: str, stage: str, signature: str, kind: str,
        summary: str, evidence: str, subject: str | None = None, fix: str | None = None,
        llm_summary: str | None = None,
    ) -> None: ...

    def record_fix_outcome(
        self, *, workflow_id: str, integration: str, signature: str, succeeded: bool,
    ) -> None: ...

    async def durable(self, workflow_id: str) -> None:
        """Return once every write for ``workflow_id`` made so far is on disk (or in the
        database); raise ``HistoryError`` if one of them could not be written."""
        ...


@dataclass(frozen=True)
class _Line:
    """A line waiting for the writer thread."""

    data: bytes
    future: Future[None]
    #: Run by the writer once the line is on disk (writing a baseline's index entry).
    then: Callable[[], None] | None


class HistorySpool:
    """Appends history writes to its file in ``directory``, durably (see the module
    docstring). ``baselines``: the index to write each snapshot to as well."""

    def __init__(
        self, directory: Path, redactor: Redactor, baselines: BaselineIndex | None = None
    ) -> None:
        self.directory = directory
        self.redactor = redactor
        self.baselines = baselines
        self._host = socket.gethostname()
        self._lock = threading.Lock()
        self._queue: list[_Line] = []
        self._draining = False
        #: Lines queued from coroutines, by workflow, until ``durable`` collects them.
        self._unawaited: dict[str, list[Future[None]]] = {}
        # Its worker is started on first use and, not being a daemon, finishes the queue
        # before the interpreter exits.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-spool")
        #: The file the writer appends to; a new one once an ingest deleted it.
        self._file: Path | None = None

    def start_workflow(
        self, *, workflow_id: str, action: str, integration: str, target: str,
        params: Mapping[str, object], fleet_id: str | None = None,
    ) -> None:
        """Spool the start of a workflow."""
        self._append(workflow_id, "start_workflow", workflow_id=workflow_id, action=action,
                     integration=integration, target=target, params=params,
                     fleet_id=fleet_id)

    def set_params(self, workflow_id: str, *, params: Mapping[str, object]) -> None:
        """Spool the checked parameters of a workflow."""
        self._append(workflow_id, "set_params", workflow_id=workflow_id, params=params)

    def record_stage(
        self, workflow_id: str, *, name: str, status: str, started_at: datetime,
        finished_at: datetime, detail: Mapping[str, object] | None = None,
    ) -> None:
        """Spool a finished stage."""
        self._append(workflow_id, "record_stage", workflow_id=workflow_id, name=name,
                     status=status, started_at=started_at.isoformat(),
                     finished_at=finished_at.isoformat(), detail=detail or {})

    def checkpoint(self, workflow_id: str, *, stage: str, state_json: str) -> None:
        """Spool a checkpoint of the whole state."""
        self._append(workflow_id, "checkpoint", workflow_id=workflow_id, stage=stage,
                     state_json=self.redactor.redact_json_text(state_json))

    def add_artifact(
        self, workflow_id: str, *, stage: str, kind: str, name: str, content: str
    ) -> None:
        """Spool an artifact of a stage."""
        self._append(workflow_id, "add_artifact", workflow_id=workflow_id, stage=stage,
                     kind=kind, name=name, content=self.redactor.redact_json_text(content))

    def save_snapshot(
        self, *, target: str, integration: str, workflow_id: str, content: str
    ) -> None:
        """Spool a pre-install snapshot, and index it once that is on disk."""
        at = datetime.now(UTC)
        stored = {"target": self.redactor.redact(target),
                  "integration": self.redactor.redact(integration),
                  "content": self.redactor.redact_json_text(content)}
        index = None if self.baselines is None else functools.partial(
            self.baselines.save, **stored, at=at)
        self._submit(workflow_id, self._event(
            "save_snapshot", {**stored, "workflow_id": workflow_id}, at), then=index)

    def finish_workflow(
        self, workflow_id: str, *, status: str, error: str | None = None,
        exit_code: int | None = None,
    ) -> None:
        """Spool the end of a workflow."""
        self._append(workflow_id, "finish_workflow", workflow_id=workflow_id, status=status,
                     error=error, exit_code=exit_code)

    def record_failure(
        self, *, workflow_id: str, integration: str, stage: str, signature: str, kind: str,
        summary: str, evidence: str, subject: str | None = None, fix: str | None = None,
        llm_summary: str | None = None,
    ) -> None:
        """Spool a failure's signature (before the run's end, like every run event)."""
        self._append(workflow_id, "record_failure", workflow_id=workflow_id,
                     integration=integration, stage=stage, signature=signature, kind=kind,
                     summary=summary, evidence=evidence, subject=subject, fix=fix,
                     llm_summary=llm_summary)

    def record_fix_outcome(
        self, *, workflow_id: str, integration: str, signature: str, succeeded: bool,
    ) -> None:
        """Spool whether a run that applied a learned fix succeeded."""
        self._append(workflow_id, "record_fix_outcome", workflow_id=workflow_id,
                     integration=integration, signature=signature, succeeded=succeeded)

    async def durable(self, workflow_id: str) -> None:
        """Return once every write for ``workflow_id`` made so far is on disk, without
        blocking the event loop; raise ``HistoryError`` if one could not be written."""
        with self._lock:
            futures = list(self._unawaited.get(workflow_id, ()))
        try:
            for future in futures:
                await asyncio.wrap_future(future)
        finally:
            with self._lock:
                left = [f for f in self._unawaited.pop(workflow_id, ()) if not f.done()]
                if left:
                    self._unawaited[workflow_id] = left

    def record_llm_usage(
        self, *, workflow_id: str | None, purpose: str, provider: str, model: str,
        status: str, prompt_tokens: int, completion_tokens: int, latency: float,
        cost: float | None, error: str | None = None,
    ) -> None:
        """Spool one LLM call's usage, as a file of its own (see the module docstring)."""
        event = self._event("record_llm_usage", dict(
            workflow_id=workflow_id, purpose=purpose, provider=provider, model=model,
            status=status, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            latency=latency, cost=cost, error=error), datetime.now(UTC))
        name = f"{LLM_USAGE_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = self.directory / f".{name}.partial"
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, event)
                os.fsync(fd)
            finally:
                os.close(fd)
            # Renamed only once complete: ingest never sees half an event.
            partial.replace(self.directory / f"{name}.jsonl")
        except OSError as exc:
            raise _spool_error(self.directory, exc) from exc

    def _event(self, op: str, args: Mapping[str, object], at: datetime) -> bytes:
        event = {
            "op": op,  # first: ingest tells starts and finishes by a line's first bytes
            "pid": os.getpid(),
            "host": self._host,
            "at": at.isoformat(),
            "args": self.redactor.redact_value(args),
        }
        return (json.dumps(event, ensure_ascii=False) + "\n").encode()

    def _append(self, workflow_id: str, op: str, /, **args: object) -> None:
        self._submit(workflow_id, self._event(op, args, datetime.now(UTC)))

    def _submit(
        self, workflow_id: str, data: bytes, then: Callable[[], None] | None = None
    ) -> None:
        """Queue a line; from plain code (no event loop running), wait until it is on disk."""
        line = _Line(data, Future(), then)
        # Running: a waiter that is cancelled must not cancel the write (nor break the
        # writer, which then sets the result of a cancelled future).
        line.future.set_running_or_notify_cancel()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            in_coroutine = False
        else:
            in_coroutine = True
        with self._lock:
            self._queue.append(line)
            if in_coroutine:
                self._unawaited.setdefault(workflow_id, []).append(line.future)
            if not self._draining:
                self._draining = True
                self._writer.submit(self._drain)
        if not in_coroutine:
            line.future.result()

    def _drain(self) -> None:
        """The writer thread: write batches until nothing is queued."""
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._draining = False
                    return
            try:
                self._write(batch)
            except BaseException as exc:
                # A bug: the workflows waiting get it rather than waiting forever.
                with self._lock:
                    self._draining = False
                for line in batch:
                    if not line.future.done():
                        line.future.set_exception(exc)
                raise

    def _write(self, batch: list[_Line]) -> None:
        """Append the batch at once and fsync it, then report each line written."""
        try:
            self._append_to_file(b"".join(line.data for line in batch))
        except OSError as exc:
            error = _spool_error(self.directory, exc)
            for line in batch:
                line.future.set_exception(error)
            return
        for line in batch:
            try:
                if line.then is not None:
                    line.then()
            except HistoryError as exc:  # the index's: for the workflow of this line only
                line.future.set_exception(exc)
            else:
                line.future.set_result(None)

    def _append_to_file(self, data: bytes) -> None:
        """Append ``data`` to this spool's file and fsync it; to a new file once an ingest
        deleted it (never under the old name: the store may still count its lines)."""
        while True:
            flags = os.O_WRONLY | os.O_APPEND
            if self._file is None:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._file = self.directory / f"{time.time_ns():020d}-{uuid.uuid4().hex}.jsonl"
                flags |= os.O_CREAT | os.O_EXCL
            try:
                fd = os.open(self._file, flags, 0o600)
            except FileNotFoundError:
                self._file = None
                continue
            try:
                # Shared with appends, exclusive for the ingest deleting the file.
                fcntl.flock(fd, fcntl.LOCK_SH)
                status = os.fstat(fd)
                if status.st_nlink == 0:  # deleted between our open and our lock
                    self._file = None
                    continue
                _write_whole(fd, data, status.st_size)
                os.fsync(fd)
                return
            finally:
                os.close(fd)


def _spool_error(directory: Path, exc: OSError) -> HistoryError:
    error = HistoryError(f"cannot write the history spool {directory}: {exc.strerror}",
                         hint=_WRITE_HINT)
    error.__cause__ = exc
    return error


def _write_whole(fd: int, data: bytes, size: int) -> None:
    """Append ``data`` (whole lines) to ``fd``, of ``size`` bytes so far: one write, repeated
    only if the kernel took part of it. If it fails, the file is cut back to its last whole
    line, so that the next append does not continue a torn one."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        written = len(data) - len(view)
        os.ftruncate(fd, size + data.rfind(b"\n", 0, written) + 1)
        raise


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` (whole lines) to ``path`` (created 0600) and fsync it; one writer at
    a time per file (see ``_write_whole``)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        _write_whole(fd, data, os.fstat(fd).st_size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replay(store: HistoryStore, event: Mapping[str, Any]) -> None:
    op, args = event["op"], dict(event["args"])
    at = datetime.fromisoformat(event["at"])
    if op == "start_workflow":
        store.start_workflow(**args, origin=Origin(int(event["pid"]), str(event["host"]), at))
    elif op == "set_params":
        store.set_params(args["workflow_id"], params=args["params"])
    elif op == "record_stage":
        store.record_stage(
            args.pop("workflow_id"),
            name=args["name"],
            status=args["status"],
            started_at=datetime.fromisoformat(args["started_at"]),
            finished_at=datetime.fromisoformat(args["finished_at"]),
            detail=args["detail"],
        )
    elif op == "checkpoint":
        store.checkpoint(args.pop("workflow_id"), **args, at=at)
    elif op == "add_artifact":
        store.add_artifact(args.pop("workflow_id"), **args, at=at)
    elif op == "save_snapshot":
        store.save_snapshot(**args, at=at)
    elif op == "finish_workflow":
        store.finish_workflow(args.pop("workflow_id"), **args, at=at)
    elif op == "record_llm_usage":
        store.record_llm_usage(**args, at=at)
    elif op == "record_failure":
        store.record_failure(**args, at=at)
    elif op == "record_fix_outcome":
        store.record_fix_outcome(**args, at=at)
    else:
        raise ValueError(f"unknown spooled operation {op!r}")


def ingest(store: HistoryStore, directory: Path) -> int:
    """Move every spooled event not yet in ``store`` into it; returns how many moved."""
    if not directory.is_dir():
        return 0
    moved = 0
    deleted: list[str] = []
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # One reader at a time: two would both take in the same new lines.
        fcntl.flock(lock, fcntl.LOCK_EX)
        for path in sorted(directory.glob("*.jsonl")):
            count, done = _ingest_file(store, path)
            moved += count
            if done:
                deleted.append(path.name)
    finally:
        try:
            if deleted:
                # Only once the files are gone: a crash before a deletion must find the count.
                store.forget_spool_progress(deleted)
        finally:
            os.close(lock)
    return moved


def _ingest_file(store: HistoryStore, path: Path) -> tuple[int, bool]:
    """Take in ``path``'s new lines; returns how many, and whether the file was done and
    is deleted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, False
    # The last piece may be a line still being written: only whole lines count.
    lines = data.split(b"\n")[:-1]
    applied = store.spool_progress(path.name)
    if applied is None:
        legacy = path.with_suffix(_LEGACY_COUNT)
        applied = int(legacy.read_text()) if legacy.exists() else 0
    if len(lines) > applied:
        _apply(store, path, lines, applied)
    moved = max(len(lines) - applied, 0)
    # A usage file is complete from the moment it exists; another file, once every
    # workflow started in it has finished (nothing comes after a finish_workflow), or
    # once its writer is gone.
    started = sum(line.startswith(_STARTED) for line in lines)
    done = path.name.startswith(LLM_USAGE_PREFIX) or (
        started == sum(line.startswith(_FINISHED) for line in lines)) or (
        bool(lines) and _writer_gone(lines[0]))
    if not (lines and done and _delete_unless_grown(path, len(data))):
        return moved, False
    path.with_suffix(_LEGACY_COUNT).unlink(missing_ok=True)
    return moved, True


def _writer_gone(line: bytes) -> bool:
    """Whether the process that wrote ``line`` (a spool file's: all its lines are one
    process's) is gone from this host; one on another host counts as alive."""
    try:
        event = json.loads(line)
        pid, host = int(event["pid"]), str(event["host"])
    except (ValueError, KeyError, TypeError):
        return False  # a damaged line: _apply has named it already
    return host == socket.gethostname() and not pid_alive(pid)


def _delete_unless_grown(path: Path, size: int) -> bool:
    """Delete ``path`` if it still holds ``size`` bytes (all taken in), under its lock: an
    append in progress finishes first, and a later one finds the file gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size != size:
            return False
        path.unlink()
        return True
    finally:
        os.close(fd)


def _apply(store: HistoryStore, path: Path, lines: list[bytes], applied: int) -> None:
    """Replay ``lines[applied:]`` and count them, in one transaction."""
    failed_at: int | None = None
    try:
        with store.batch():
            for number, raw in enumerate(lines[applied:], start=applied + 1):
                failed_at = number
                _replay_line(store, path, number, raw)
            failed_at = None
            store.record_spool_progress(path.name, len(lines))
    except HistoryError:
        if failed_at is not None and failed_at > applied + 1:
            # The lines before the bad one are history up to the damage: keep them.
            _apply(store, path, lines[: failed_at - 1], applied)
        raise


def _replay_line(store: HistoryStore, path: Path, number: int, raw: bytes) -> None:
    try:
        _replay(store, json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise HistoryError(
            f"{path}, line {number}: a spooled history event cannot be read: {exc}",
            hint="The file is kept: repair or delete that line (or move the file aside) "
            "to let the rest through.",
        ) from exc
