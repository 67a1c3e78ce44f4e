"""Spool progress: how many lines of each spool file the store holds.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

Counted in the same transaction as the events themselves, so a crash between storing a
file's events and counting them can no longer store them twice (the count used to live in
a ``.applied`` file beside the spool file). Frozen history like every migration: column
types are spelled out here, not imported from ``workflow_agent.storage.tables``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``spool_progress``."""
    op.create_table(
        "spool_progress",
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("applied", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("file", name="pk_spool_progress"),
    )


def downgrade() -> None:
    """Drop ``spool_progress``: spool files still present are then taken in from their
    first line again."""
    op.drop_table("spool_progress")
