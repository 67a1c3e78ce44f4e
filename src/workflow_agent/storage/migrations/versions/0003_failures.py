"""Failure learning: the signatures of failed runs and the fixes that worked for them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-02-10

Frozen history like every migration: column types are spelled out here, not imported
from ``workflow_agent.storage.tables``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``failures``."""
    op.create_table(
        "failures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("integration", sa.String(255), nullable=False),
        sa.Column("signature", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("llm_summary", sa.Text(), nullable=True),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("subject", sa.String(255), nullable=True),
        sa.Column("fix", sa.String(64), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_workflow_id", sa.String(36), nullable=False),
        sa.Column("last_stage", sa.String(64), nullable=False),
        sa.Column("fix_applied", sa.Integer(), nullable=False),
        sa.Column("fix_succeeded", sa.Integer(), nullable=False),
        sa.Column("proven_by", sa.String(36), nullable=True),
        sa.Column("fix_last_result", sa.String(16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_failures"),
        sa.UniqueConstraint("integration", "signature", name="uq_failures_integration"),
    )
    op.create_index("ix_failures_last_seen", "failures", ["last_seen"])


def downgrade() -> None:
    """Drop ``failures`` (what was learned is lost)."""
    op.drop_table("failures")
