"""007-session-versions: the compare-and-set counter of the session store.

``sessions.version`` follows the version of the live session in Redis. The
store writes the durable copy with ``UPDATE ... WHERE version < :new``, so
when two updates of one session write through concurrently the newer one
wins, whichever commits first. Existing rows start at 1.

Revision ID: 007
Revises: 006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "007"
down_revision: str | None = "006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "sessions",
        sa.Column("version", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("sessions", "version")
