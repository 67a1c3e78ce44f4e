"""What the history store reads back: workflow summaries and full records, built from rows.

Also the vocabulary those records use (actions, workflow and stage statuses). A workflow
whose row still says ``running`` but whose process is gone from this host is reported as
``incomplete``; the row is left alone, the status is derived here on every read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from workflow_agent.errors import HistoryError

ACTIONS = frozenset({"install", "verify", "uninstall", "plan", "rollback"})
RUNNING = "running"
#: Derived on read for a ``running`` row whose process is gone; never stored.
INCOMPLETE = "incomplete"
FINAL_STATUSES = frozenset({"succeeded", "failed", "refused"})
WORKFLOW_STATUSES = frozenset({RUNNING, INCOMPLETE, *FINAL_STATUSES})
STAGE_STATUSES = frozenset({"succeeded", "failed", "skipped"})


@dataclass(frozen=True, kw_only=True)
class WorkflowSummary:
    """One line of ``workflow-agent history``.

    ``status`` is ``incomplete`` when the row says ``running`` but the process that
    ran it is gone from this host.
    """

    id: str
    action: str
    integration: str
    target: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration: float | None
    error: str | None
    exit_code: int | None
    fleet_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class StageEntry:
    """One stage of a workflow as recorded."""

    name: str
    status: str
    started_at: datetime
    finished_at: datetime
    duration: float
    detail: dict[str, Any]


class CheckpointEntry(NamedTuple):
    """A checkpoint's ``(stage, created_at)``; the state itself is ``last_checkpoint``'s."""

    stage: str
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class ArtifactEntry:
    """A script, output, facts document, ... that a stage produced."""

    stage: str
    kind: str
    name: str
    content: str
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class WorkflowRecord(WorkflowSummary):
    """Everything recorded about one workflow, in the order it was written."""

    params: dict[str, Any]
    pid: int
    host: str
    stages: list[StageEntry] = field(default_factory=list)
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    artifacts: list[ArtifactEntry] = field(default_factory=list)



#: How an LLM call ended, in ``llm_usage.status``.
LLM_USAGE_STATUSES = frozenset({"ok", "cached", "failed"})


@dataclass(frozen=True, kw_only=True)
class LLMUsageEntry:
    """One LLM call: who answered, what it cost, and for which workflow (if any).

    ``latency`` is what the caller waited, retries and fallbacks included; ``cost`` is
    in US dollars, ``None`` where the provider's prices are not configured.
    """

    workflow_id: str | None
    purpose: str
    provider: str
    model: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    latency: float
    cost: float | None
    error: str | None
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class LLMCacheEntry:
    """A cached LLM answer (already redacted) and the tokens it cost when it was asked."""

    key: str
    provider: str
    model: str
    content: str
    prompt_tokens: int
    completion_tokens: int
    created_at: datetime

def summary_from_row(row: Any, hostname: str) -> WorkflowSummary:
    """A ``workflows`` row as a summary; ``hostname`` is this host's, for the liveness check."""
    return WorkflowSummary(
        id=row.id,
        action=row.action,
        integration=row.integration,
        target=row.target,
        status=_derive_status(row.status, row.pid, row.host, hostname),
        started_at=row.started_at,
        finished_at=row.finished_at,
        duration=row.duration,
        error=row.error,
        exit_code=row.exit_code,
        fleet_id=row.fleet_id,
    )


def record_from_rows(
    row: Any,
    hostname: str,
    *,
    stage_rows: Iterable[Any],
    checkpoint_rows: Iterable[Any],
    artifact_rows: Iterable[Any],
) -> WorkflowRecord:
    """A ``workflows`` row and its stage, checkpoint and artifact rows as one record.

    Raises ``HistoryError`` when a stored JSON object (params, stage detail) is damaged.
    """
    summary = summary_from_row(row, hostname)
    return WorkflowRecord(
        **{f.name: getattr(summary, f.name) for f in fields(WorkflowSummary)},
        params=_load_json_object(row.params_json),
        pid=row.pid,
        host=row.host,
        stages=[
            StageEntry(
                name=s.name,
                status=s.status,
                started_at=s.started_at,
                finished_at=s.finished_at,
                duration=s.duration,
                detail=_load_json_object(s.detail_json),
            )
            for s in stage_rows
        ],
        checkpoints=[CheckpointEntry(c.stage, c.created_at) for c in checkpoint_rows],
        artifacts=[
            ArtifactEntry(
                stage=a.stage,
                kind=a.kind,
                name=a.name,
                content=a.content,
                created_at=a.created_at,
            )
            for a in artifact_rows
        ],
    )


def _derive_status(status: str, pid: int, host: str, hostname: str) -> str:
    # Another host's processes cannot be checked from here: trust the row.
    if status != RUNNING or host != hostname:
        return status
    return RUNNING if pid_alive(pid) else INCOMPLETE


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        # os.kill(0, ...) would signal our whole process group.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it just belongs to another user
    # A killed process nobody has reaped yet still answers signals; on Linux its state
    # in /proc says Z. Elsewhere there is no cheap way to tell, so it counts as alive.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _load_json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise HistoryError(
            f"the history holds invalid JSON: {exc}",
            hint="The history database may be damaged; move it aside to start afresh.",
        ) from exc
    if not isinstance(value, dict):
        raise HistoryError(
            f"the history holds {type(value).__name__} where an object was expected",
            hint="The history database may be damaged; move it aside to start afresh.",
        )
    return value
