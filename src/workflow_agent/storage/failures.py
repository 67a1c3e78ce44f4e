"""What failure learning keeps in the history store: signatures, their fixes, and whether
the fixes worked (see ``workflow_agent.recovery.failures`` for what a signature is).

``FailureHistory`` is mixed into ``HistoryStore``: one row per (integration, signature),
counted each time it recurs; a run that applied the fix and then succeeded proves it.
Runs write through the spool (``record_failure`` and ``record_fix_outcome`` ops); reads
come here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, insert, select, update

from workflow_agent.storage.tables import failures

if TYPE_CHECKING:
    from workflow_agent.secrets import Redactor


@dataclass(frozen=True, kw_only=True)
class FailureEntry:
    """One learned failure: what it is, how often it happened, its fix and its record."""

    integration: str
    signature: str
    kind: str
    summary: str
    llm_summary: str | None
    evidence: str
    subject: str | None
    fix: str | None
    count: int
    first_seen: datetime
    last_seen: datetime
    last_workflow_id: str
    last_stage: str
    fix_applied: int
    fix_succeeded: int
    proven_by: str | None
    fix_last_result: str | None

    @property
    def proven(self) -> bool:
        """A run that applied the fix succeeded."""
        return self.proven_by is not None


class FailureHistory:
    """The failure-learning part of ``HistoryStore``."""

    redactor: Redactor

    if TYPE_CHECKING:
        def _write(self, doing: str) -> AbstractContextManager[Connection]: ...

        def _read(self, doing: str) -> AbstractContextManager[Connection]: ...

    def record_failure(
        self, *, workflow_id: str, integration: str, stage: str, signature: str, kind: str,
        summary: str, evidence: str, subject: str | None = None, fix: str | None = None,
        llm_summary: str | None = None, at: datetime | None = None,
    ) -> None:
        """Count one occurrence of ``signature`` for ``integration`` (created if new)."""
        redact = self.redactor.redact
        when = (at or datetime.now(UTC)).astimezone(UTC)
        values = {
            "kind": kind, "summary": redact(summary), "evidence": redact(evidence),
            "subject": None if subject is None else redact(subject), "fix": fix,
            "last_seen": when, "last_workflow_id": workflow_id, "last_stage": stage,
        }
        if llm_summary is not None:
            values["llm_summary"] = redact(llm_summary)
        key = (failures.c.integration == integration) & (failures.c.signature == signature)
        with self._write(f"record the failure {signature!r}") as conn:
            count = conn.execute(select(failures.c.count).where(key)).scalar_one_or_none()
            if count is None:
                conn.execute(insert(failures).values(
                    integration=integration, signature=signature, count=1, first_seen=when,
                    fix_applied=0, fix_succeeded=0, **values))
            else:
                conn.execute(update(failures).where(key).values(count=count + 1, **values))

    def record_fix_outcome(
        self, *, workflow_id: str, integration: str, signature: str, succeeded: bool,
        at: datetime | None = None,
    ) -> None:
        """A run applied the fix of ``signature``; it then succeeded or not."""
        key = (failures.c.integration == integration) & (failures.c.signature == signature)
        with self._write(f"record the outcome of the fix for {signature!r}") as conn:
            row = conn.execute(select(failures).where(key)).first()
            if row is None:
                return  # learned in another database: nothing here to count against
            conn.execute(update(failures).where(key).values(
                fix_applied=row.fix_applied + 1,
                fix_succeeded=row.fix_succeeded + int(succeeded),
                proven_by=row.proven_by or (workflow_id if succeeded else None),
                fix_last_result="succeeded" if succeeded else "failed",
            ))

    def list_failures(self, *, integration: str | None = None) -> list[FailureEntry]:
        """What was learned, most recently seen first; only ``integration``'s if given."""
        query = select(failures).order_by(failures.c.last_seen.desc(), failures.c.id.desc())
        if integration is not None:
            query = query.where(failures.c.integration == integration)
        with self._read("read the learned failures") as conn:
            rows = conn.execute(query).all()
        names = [c.name for c in failures.columns if c.name != "id"]
        return [FailureEntry(**{name: getattr(row, name) for name in names}) for row in rows]
