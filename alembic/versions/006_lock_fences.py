"""006-lock-fences: the highest fencing token recorded per lock name.

``uow.fence(lock)`` upserts its token here inside the unit of work's
transaction and refuses the write when a higher token was recorded already,
so a lock holder that was paused past its lease cannot commit after the next
holder did. The row lock the upsert takes also orders fenced writers.

Revision ID: 006
Revises: 005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "006"
down_revision: str | None = "005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lock_fences",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_lock_fences")),
    )


def downgrade() -> None:
    op.drop_table("lock_fences")
