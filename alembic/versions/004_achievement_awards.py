"""004-achievement-awards: idempotent awarding of achievements.

Two unique partial indexes: a one-time achievement (first_task, tasks_10,
tasks_100) exists at most once per agent; a repeatable one (completion_streak,
fast_completion) at most once per agent and triggering task
(``metadata->>'task_id'``). Concurrent awarding of the same achievement then
yields one row at any isolation level.

Revision ID: 004
Revises: 003
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "004"
down_revision: str | None = "003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here: a migration must not change when the models do.
ONE_TIME = "achievement_type IN ('first_task', 'tasks_10', 'tasks_100')"
PER_TASK = "achievement_type IN ('completion_streak', 'fast_completion')"


def upgrade() -> None:
    op.create_index(
        "uq_achievements_award_once",
        "achievements",
        ["agent_id", "achievement_type"],
        unique=True,
        postgresql_where=sa.text(ONE_TIME),
    )
    op.create_index(
        "uq_achievements_award_per_task",
        "achievements",
        ["agent_id", "achievement_type", sa.text("(metadata ->> 'task_id')")],
        unique=True,
        postgresql_where=sa.text(PER_TASK),
    )


def downgrade() -> None:
    op.drop_index("uq_achievements_award_per_task", table_name="achievements")
    op.drop_index("uq_achievements_award_once", table_name="achievements")
