"""008-cache-invalidation-log: the durable log of undelivered cache invalidations.

``cache_invalidations`` holds the invalidations a commit could not hand to
Redis (the writer could not reach it, or Redis refused the command): written
inside the committing transaction while the writer's breaker is open, read
and cleared by every process when it reconnects and every probe interval.
Empty in normal operation.

Revision ID: 008
Revises: 007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "008"
down_revision: str | None = "007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cache_invalidations",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("targets", postgresql.JSONB(), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_invalidations")),
    )
    op.create_index("ix_cache_invalidations_namespace", "cache_invalidations", ["namespace", "id"])


def downgrade() -> None:
    op.drop_table("cache_invalidations")  # drops its index too
