"""002-indexes: B-tree, GIN, partial and full-text indexes.

Revision ID: 002
Revises: 001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "002"
down_revision: str | None = "001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BTREE = [
    ("ix_agents_status", "agents", ["status"]),
    ("ix_agents_role", "agents", ["role"]),
    ("ix_agents_created_at", "agents", ["created_at"]),
    ("ix_tasks_status", "tasks", ["status"]),
    ("ix_tasks_type", "tasks", ["type"]),
    ("ix_tasks_priority", "tasks", ["priority"]),
    ("ix_tasks_created_at", "tasks", ["created_at"]),
    ("ix_tasks_agent_id", "tasks", ["agent_id"]),
    ("ix_sessions_user_id", "sessions", ["user_id"]),
    ("ix_sessions_expires_at", "sessions", ["expires_at"]),
    ("ix_sessions_created_at", "sessions", ["created_at"]),
    ("ix_achievements_agent_id", "achievements", ["agent_id"]),
    ("ix_achievements_type", "achievements", ["achievement_type"]),
    ("ix_achievements_created_at", "achievements", ["created_at"]),
]

GIN = [
    ("ix_agents_capabilities", "agents", ["capabilities"]),
    ("ix_agents_metadata", "agents", ["metadata"]),
    ("ix_tasks_payload", "tasks", ["payload"]),
    ("ix_sessions_data", "sessions", ["data"]),
    ("ix_achievements_metadata", "achievements", ["metadata"]),
]


def upgrade() -> None:
    for name, table, columns in BTREE:
        op.create_index(name, table, columns)
    for name, table, columns in GIN:
        op.create_index(name, table, columns, postgresql_using="gin")
    op.create_index(
        "ix_tasks_pending_priority",
        "tasks",
        [sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    # Full-text search documents; the repositories query the same expressions.
    op.create_index(
        "ix_agents_search",
        "agents",
        [
            sa.text(
                "(to_tsvector('simple'::regconfig, coalesce(name, '')) || "
                "to_tsvector('simple'::regconfig, coalesce(role, '')))"
            )
        ],
        postgresql_using="gin",
    )
    op.create_index(
        "ix_tasks_search",
        "tasks",
        [
            sa.text(
                "(to_tsvector('simple'::regconfig, coalesce(type, '')) || "
                "jsonb_to_tsvector('simple'::regconfig, payload, '[\"string\"]'::jsonb))"
            )
        ],
        postgresql_using="gin",
    )


def downgrade() -> None:
    for name in ("ix_tasks_search", "ix_agents_search", "ix_tasks_pending_priority"):
        op.drop_index(name)
    for name, table, _ in reversed(GIN + BTREE):
        op.drop_index(name, table_name=table)
