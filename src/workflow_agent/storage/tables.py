"""The history schema as SQLAlchemy Core tables.

Types are kept portable so the same tables work on SQLite and PostgreSQL: JSON is
stored as ``Text`` holding JSON (SQLite has no JSON column type worth relying on) and
every timestamp is UTC. The schema itself is created by the Alembic migrations in
``migrations/versions``; these definitions must describe the same thing (a test checks).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

#: Constraint names are fixed by convention so that later migrations can refer to them
#: by name on every backend (SQLite otherwise leaves them unnamed).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that is always UTC in and out.

    SQLite keeps ``DateTime`` as text without an offset and hands back naive values;
    PostgreSQL's ``timestamptz`` hands back values in the session's time zone. Both are
    normalised here so callers only ever see aware UTC datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive value would be stored as whatever local time it happened to be in.
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _workflow_fk() -> Column[str]:
    # ON DELETE CASCADE so pruning old workflows later is a single DELETE.
    return Column(
        "workflow_id",
        String(36),
        ForeignKey("workflows.id", ondelete="CASCADE"),
        nullable=False,
    )


workflows = Table(
    "workflows",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("action", String(32), nullable=False),
    Column("integration", String(255), nullable=False),
    Column("target", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("params_json", Text, nullable=False),
    Column("fleet_id", String(36), nullable=True),
    Column("pid", Integer, nullable=False),
    Column("host", String(255), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("duration", Float, nullable=True),
    Column("error", Text, nullable=True),
    Column("exit_code", Integer, nullable=True),
    Index("ix_workflows_started_at", "started_at"),
    Index("ix_workflows_integration_started_at", "integration", "started_at"),
    Index("ix_workflows_status", "status"),
    Index("ix_workflows_fleet_id", "fleet_id"),
)

stages = Table(
    "stages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _workflow_fk(),
    Column("name", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=False),
    Column("duration", Float, nullable=False),
    Column("detail_json", Text, nullable=False),
    Index("ix_stages_workflow_id", "workflow_id"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _workflow_fk(),
    Column("stage", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("state_json", Text, nullable=False),
    Index("ix_checkpoints_workflow_id", "workflow_id"),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _workflow_fk(),
    Column("stage", String(64), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("name", String(255), nullable=False),
    Column("content", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_artifacts_workflow_id", "workflow_id"),
)

snapshots = Table(
    "snapshots",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("target", Text, nullable=False),
    Column("integration", String(255), nullable=False),
    # SET NULL, not CASCADE: the snapshot must outlive the install workflow that took it,
    # since a much later uninstall compares against it.
    Column(
        "workflow_id",
        String(36),
        ForeignKey("workflows.id", ondelete="SET NULL"),
        nullable=True,
    ),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("content", Text, nullable=False),
    Index("ix_snapshots_target_integration", "target", "integration", "created_at"),
    Index("ix_snapshots_workflow_id", "workflow_id"),
)

llm_cache = Table(
    "llm_cache",
    metadata,
    # Hex SHA-256 of (provider, model, redacted messages, settings): the prompt itself is
    # never stored, only this hash of its redacted form.
    Column("key", String(64), primary_key=True),
    Column("provider", String(64), nullable=False),
    Column("model", String(255), nullable=False),
    Column("content", Text, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

llm_usage = Table(
    "llm_usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # No foreign key: calls outside any workflow have none, and a spooled usage event may
    # be ingested before its workflow's start (they come from different spool files).
    Column("workflow_id", String(36), nullable=True),
    Column("purpose", String(64), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("model", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency", Float, nullable=False),
    Column("cost", Float, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_llm_usage_workflow_id", "workflow_id"),
    Index("ix_llm_usage_created_at", "created_at"),
)

failures = Table(
    "failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("integration", String(255), nullable=False),
    # The signature's key (see workflow_agent.recovery.failures): the same every time.
    Column("signature", String(255), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("summary", Text, nullable=False),
    #: The configured LLM's root-cause summary of the latest occurrence, if any.
    Column("llm_summary", Text, nullable=True),
    Column("evidence", Text, nullable=False),
    Column("subject", String(255), nullable=True),
    Column("fix", String(64), nullable=True),
    Column("count", Integer, nullable=False),
    Column("first_seen", UTCDateTime(), nullable=False),
    Column("last_seen", UTCDateTime(), nullable=False),
    # No foreign key, like llm_usage: what was learned outlives pruned workflows.
    Column("last_workflow_id", String(36), nullable=False),
    Column("last_stage", String(64), nullable=False),
    #: How often a later run applied the fix, and how often that run then succeeded.
    Column("fix_applied", Integer, nullable=False),
    Column("fix_succeeded", Integer, nullable=False),
    #: The first run the fix worked for: from then on the fix is proven.
    Column("proven_by", String(36), nullable=True),
    Column("fix_last_result", String(16), nullable=True),
    UniqueConstraint("integration", "signature"),
    Index("ix_failures_last_seen", "last_seen"),
)

spool_progress = Table(
    "spool_progress",
    metadata,
    # A spool file's name (see workflow_agent.storage.spool): unique, as it holds a uuid.
    Column("file", String(255), primary_key=True),
    #: How many of its lines are in: counted in the transaction that stored them.
    Column("applied", Integer, nullable=False),
)
