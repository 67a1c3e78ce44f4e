"""The write side of the history for a run: durable event files, ingested into the store.

A run appends each history write (start, stage, checkpoint, artifact, snapshot, finish)
as one JSON line to its own file in the spool folder, and fsyncs it before going on.
That needs only the standard library, so recording a run costs no SQLAlchemy import
(about 0.15 s of start-up, measured in bench/rerun.py). ``HistoryStore`` ingests the
files whenever it is opened or read, so every reader sees every run, finished or not; a
run killed outright leaves its file, whose events are ingested like any other and whose
dead process marks it incomplete. Secrets are masked before anything reaches the disk.

Each file has a sibling ``.applied`` holding how many of its lines the store already
took; a file is deleted once its ``finish_workflow`` line is in. LLM usage events are the
exception: each is a whole file of its own (``llm-usage-*.jsonl``, renamed into place
complete), since a call may serve no workflow or come after its end; such a file is
deleted as soon as it is in.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from workflow_agent.errors import HistoryError
from workflow_agent.secrets import Redactor

if TYPE_CHECKING:
    from workflow_agent.storage.history import HistoryStore

#: Name prefix of the one-event files that hold LLM usage.
LLM_USAGE_PREFIX = "llm-usage-"


@dataclass(frozen=True)
class Origin:
    """Who wrote a spooled event, and when: replayed into the store as it happened."""

    pid: int
    host: str
    at: datetime


class HistoryWriter(Protocol):
    """What records history: the store itself, or a spool in front of it."""

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


class HistorySpool:
    """Appends history writes to ``directory/<workflow id>.jsonl``, durably."""

    def __init__(self, directory: Path, redactor: Redactor) -> None:
        self.directory = directory
        self.redactor = redactor
        self._host = socket.gethostname()

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
        """Spool a pre-install snapshot."""
        self._append(workflow_id, "save_snapshot", target=target, integration=integration,
                     workflow_id=workflow_id, content=self.redactor.redact_json_text(content))

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

    def record_llm_usage(
        self, *, workflow_id: str | None, purpose: str, provider: str, model: str,
        status: str, prompt_tokens: int, completion_tokens: int, latency: float,
        cost: float | None, error: str | None = None,
    ) -> None:
        """Spool one LLM call's usage, as a file of its own (see the module docstring)."""
        event = self._event("record_llm_usage", dict(
            workflow_id=workflow_id, purpose=purpose, provider=provider, model=model,
            status=status, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            latency=latency, cost=cost, error=error))
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
            raise HistoryError(
                f"cannot write the history spool {self.directory}: {exc.strerror}",
                hint="Check that the data directory is writable and not full.",
            ) from exc

    def _event(self, op: str, args: Mapping[str, object]) -> bytes:
        event = {
            "op": op,
            "pid": os.getpid(),
            "host": self._host,
            "at": datetime.now(UTC).isoformat(),
            "args": self.redactor.redact_value(args),
        }
        return (json.dumps(event, ensure_ascii=False) + "\n").encode()

    def _append(self, file_id: str, op: str, /, **args: object) -> None:
        line = self._event(op, args)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            append_durably(self.directory / f"{file_id}.jsonl", line)
        except OSError as exc:
            raise HistoryError(
                f"cannot write the history spool {self.directory}: {exc.strerror}",
                hint="Check that the data directory is writable and not full.",
            ) from exc


def append_durably(path: Path, line: bytes) -> None:
    """Append ``line`` to ``path`` (created 0600) and fsync it before returning.

    One write of one line: concurrent appends never interleave inside a line.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
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
    for path in sorted(directory.glob("*.jsonl")):
        moved += _ingest_file(store, path)
    return moved


def _ingest_file(store: HistoryStore, path: Path) -> int:
    applied_path = path.with_suffix(".applied")
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return 0  # another process finished ingesting it just now
    with handle:
        # Two readers ingesting the same file would apply its events twice.
        fcntl.flock(handle, fcntl.LOCK_EX)
        if not path.exists():
            return 0
        applied = int(applied_path.read_text()) if applied_path.exists() else 0
        # The last piece may be a line still being written: only whole lines count.
        lines = handle.read().split(b"\n")[:-1]
        for number, raw in enumerate(lines[applied:], start=applied + 1):
            try:
                event = json.loads(raw)
                _replay(store, event)
            except (ValueError, KeyError, TypeError) as exc:
                raise HistoryError(
                    f"{path}, line {number}: a spooled history event cannot be read: {exc}",
                    hint="The file is kept; move it aside to let other history through.",
                ) from exc
            except HistoryError as exc:
                # A crash between storing an event and counting it: it is stored already.
                if not (event["op"] == "start_workflow" and "already" in exc.message):
                    raise
            _write_count(applied_path, number)
        # finish_workflow is always a run's last write: once it is in, the file is done.
        # A usage file is complete from the moment it exists.
        done = path.name.startswith(LLM_USAGE_PREFIX)
        if lines and (done or json.loads(lines[-1])["op"] == "finish_workflow"):
            path.unlink()
            applied_path.unlink(missing_ok=True)
        return max(len(lines) - applied, 0)


def _write_count(path: Path, count: int) -> None:
    tmp = path.with_suffix(".applied-new")
    tmp.write_text(str(count))
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
