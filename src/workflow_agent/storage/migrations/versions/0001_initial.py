"""Initial history schema: workflows, stages, checkpoints, artifacts, snapshots.

Revision ID: 0001
Revises:
Create Date: 2025-11-26

Migrations are frozen history: they spell out their own column types instead of
importing ``workflow_agent.storage.tables``, which keeps moving. After adding one,
update ``HEAD_REVISION`` in ``workflow_agent/storage/engine.py`` (a test checks).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _workflow_fk(table: str, ondelete: str, *, nullable: bool) -> sa.Column[object]:
    # Named explicitly (SQLite would leave it unnamed) so later batch migrations can
    # find it; the name follows tables.NAMING_CONVENTION.
    return sa.Column(
        "workflow_id",
        sa.String(36),
        sa.ForeignKey("workflows.id", name=f"fk_{table}_workflow_id_workflows", ondelete=ondelete),
        nullable=nullable,
    )


def upgrade() -> None:
    """Create every table of the first schema."""
    op.create_table(
        "workflows",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("integration", sa.String(255), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("params_json", sa.Text(), nullable=False),
        sa.Column("fleet_id", sa.String(36), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        _timestamp("started_at", nullable=False),
        _timestamp("finished_at", nullable=True),
        sa.Column("duration", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_workflows"),
    )
    op.create_index("ix_workflows_started_at", "workflows", ["started_at"])
    op.create_index(
        "ix_workflows_integration_started_at", "workflows", ["integration", "started_at"]
    )
    op.create_index("ix_workflows_status", "workflows", ["status"])
    op.create_index("ix_workflows_fleet_id", "workflows", ["fleet_id"])

    op.create_table(
        "stages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _workflow_fk("stages", "CASCADE", nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        _timestamp("started_at", nullable=False),
        _timestamp("finished_at", nullable=False),
        sa.Column("duration", sa.Float(), nullable=False),
        sa.Column("detail_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stages"),
    )
    op.create_index("ix_stages_workflow_id", "stages", ["workflow_id"])

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _workflow_fk("checkpoints", "CASCADE", nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.Column("state_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_checkpoints"),
    )
    op.create_index("ix_checkpoints_workflow_id", "checkpoints", ["workflow_id"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _workflow_fk("artifacts", "CASCADE", nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
    )
    op.create_index("ix_artifacts_workflow_id", "artifacts", ["workflow_id"])

    op.create_table(
        "snapshots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("integration", sa.String(255), nullable=False),
        _workflow_fk("snapshots", "SET NULL", nullable=True),
        _timestamp("created_at", nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_snapshots"),
    )
    op.create_index(
        "ix_snapshots_target_integration", "snapshots", ["target", "integration", "created_at"]
    )
    op.create_index("ix_snapshots_workflow_id", "snapshots", ["workflow_id"])


def downgrade() -> None:
    """Drop every table (the history is lost)."""
    for table in ("snapshots", "artifacts", "checkpoints", "stages", "workflows"):
        op.drop_table(table)
