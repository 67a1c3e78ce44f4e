"""The recovery agent: undoes what a change journal recorded, with a chosen strategy.

Answers ``recovery.rollback`` for the coordinator: after a failed install (automatic
rollback), for ``workflow-agent rollback`` and for ``workflow-agent recover``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workflow_agent.bus import Message, MessageBus
from workflow_agent.execution.journal import Journal, JournalStore
from workflow_agent.execution.journal_probe import observe
from workflow_agent.execution.pool import TargetPool
from workflow_agent.recovery.rollback import RollbackReport, roll_back, strategy_named

ROLLBACK = "recovery.rollback"


@dataclass(frozen=True)
class RollbackRequest:
    """Undo ``journal``'s changes on the workflow's (open) target."""

    workflow_id: str
    journal: Path
    strategy: str = "staged"
    changes: Sequence[int] = ()
    #: Refuse to overwrite files changed since the workflow ran (a later ``rollback``).
    check_drift: bool = False


class RecoveryAgent:
    """Answers ``recovery.rollback``."""

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool

    def attach(self, bus: MessageBus) -> None:
        """Serve this agent's topic on ``bus``."""
        bus.serve(ROLLBACK, self._rollback)

    async def _rollback(self, message: Message) -> RollbackReport:
        request: RollbackRequest = message.payload
        target = self.pool.get(request.workflow_id)
        strategy = strategy_named(request.strategy, request.changes)
        journal = Journal(request.journal)
        if not journal.read().observed:
            # Killed while its script ran: what it changed is learned now, from the
            # snapshot and process list the journal saved before it started.
            await observe(target, journal, journal.workflow_id)
        selections = strategy.select(JournalStore(request.journal.parent), journal)
        return await roll_back(target, selections, strategy.name,
                               check_drift=request.check_drift)
