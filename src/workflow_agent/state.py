"""Workflow state: frozen models; every stage returns a new state.

A checkpoint of the whole state is stored after every stage, so a crashed or refused
run can be read back exactly as it was. Secrets never enter the state: parameters are
masked and scripts read secrets from the environment.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from workflow_agent.execution.changes import ChangeSet
from workflow_agent.facts import Facts
from workflow_agent.recovery.failures import AppliedFix
from workflow_agent.recovery.rollback import RollbackReport
from workflow_agent.scripting.render import RenderedScript
from workflow_agent.scripting.validate import ValidationReport
from workflow_agent.strategy import StrategyDecision
from workflow_agent.verification.checks import CheckResult

Action = Literal["install", "verify", "uninstall", "plan", "rollback"]
Status = Literal["running", "succeeded", "failed", "refused"]


def now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class StageRecord(_Frozen):
    """One finished stage."""

    name: str
    status: Literal["succeeded", "failed", "skipped"]
    started_at: datetime
    finished_at: datetime
    detail: dict[str, Any] = {}

    @property
    def duration(self) -> float:
        """Seconds the stage took."""
        return (self.finished_at - self.started_at).total_seconds()


class RunSummary(_Frozen):
    """What running one script did."""

    exit_code: int
    duration: float
    timed_out: bool = False
    failed_line: int | None = None
    failed_command: str | None = None
    output_tail: str = ""


class Provenance(_Frozen):
    """Where (part of) a script came from: a ``template`` file, a ``documentation``
    passage (its citation), or an ``llm`` (provider/model)."""

    kind: Literal["template", "documentation", "llm"]
    source: str
    detail: str = ""


class ErrorInfo(_Frozen):
    """The error that ended a workflow, as the user sees it."""

    type: str
    message: str
    hint: str | None = None
    exit_code: int


class WorkflowState(_Frozen):
    """Everything known about one workflow at one point."""

    workflow_id: str
    action: Action
    integration: str
    target: str
    target_identity: str | None = None
    #: The fleet rollout this workflow is one host of (``history --fleet``), if any.
    fleet_id: str | None = None
    stage: str = "created"
    status: Status = "running"
    params: dict[str, Any] = {}
    facts: Facts | None = None
    strategy: StrategyDecision | None = None
    scripts: dict[str, RenderedScript] = {}
    #: Per action: where its script came from (templates, documentation, an LLM).
    provenance: dict[str, list[Provenance]] = {}
    validation: dict[str, ValidationReport] = {}
    #: What the install script changed on a copy-on-write copy of the target.
    rehearsal: ChangeSet | None = None
    #: What the run changed on the target, as its change journal recorded it.
    changes: list[str] = []
    #: What undoing those changes did (after a failure, or for a rollback workflow).
    rollback: RollbackReport | None = None
    runs: dict[str, RunSummary] = {}
    #: Fixes learned from earlier failures that this run applied (improvement agent).
    fixes: list[AppliedFix] = []
    checks: list[CheckResult] = []
    #: Uninstall proof: what is still different from the pre-install snapshot.
    leftovers: list[str] = []
    notes: list[str] = []
    stages: tuple[StageRecord, ...] = ()
    error: ErrorInfo | None = None
    started_at: datetime
    finished_at: datetime | None = None

    def after(self, record: StageRecord, **changes: Any) -> WorkflowState:
        """The state after ``record``'s stage, with ``changes`` applied."""
        return self.model_copy(
            update={"stage": record.name, "stages": (*self.stages, record), **changes}
        )

    @property
    def exit_code(self) -> int:
        """0 on success, else the error's exit code."""
        return 0 if self.error is None else self.error.exit_code
