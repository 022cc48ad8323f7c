"""Secondary indexes (migrations 002 and 003), declared once on the models so
that ``alembic check`` compares them with the database."""

from __future__ import annotations

from sqlalchemy import Index, cast, func, literal, text
from sqlalchemy.dialects.postgresql import JSONB, REGCONFIG

from orchestrator_data.models.achievement import (
    ONE_TIME_ACHIEVEMENTS,
    PER_TASK_ACHIEVEMENTS,
    Achievement,
)
from orchestrator_data.models.agent import Agent
from orchestrator_data.models.audit_log import AuditLog
from orchestrator_data.models.session import Session
from orchestrator_data.models.task import Task

# Full-text documents. The expressions are IMMUTABLE (explicit 'simple'
# configuration), so PostgreSQL can index them; the repositories search with
# the very same expressions so the planner uses the GIN indexes.
SIMPLE = cast(literal("simple"), REGCONFIG)
AGENT_SEARCH_DOCUMENT = func.to_tsvector(SIMPLE, func.coalesce(Agent.name, "")).op("||")(
    func.to_tsvector(SIMPLE, func.coalesce(Agent.role, ""))
)
TASK_SEARCH_DOCUMENT = func.to_tsvector(SIMPLE, func.coalesce(Task.type, "")).op("||")(
    func.jsonb_to_tsvector(SIMPLE, Task.payload, cast(literal('["string"]'), JSONB))
)

INDEXES_002 = (
    Index("ix_agents_status", Agent.status),
    Index("ix_agents_role", Agent.role),
    Index("ix_agents_created_at", Agent.created_at),
    Index("ix_agents_capabilities", Agent.capabilities, postgresql_using="gin"),
    Index("ix_agents_metadata", Agent.metadata_, postgresql_using="gin"),
    Index("ix_agents_search", AGENT_SEARCH_DOCUMENT, postgresql_using="gin"),
    Index("ix_tasks_status", Task.status),
    Index("ix_tasks_type", Task.type),
    Index("ix_tasks_priority", Task.priority),
    Index("ix_tasks_created_at", Task.created_at),
    Index("ix_tasks_agent_id", Task.agent_id),
    Index("ix_tasks_payload", Task.payload, postgresql_using="gin"),
    Index("ix_tasks_search", TASK_SEARCH_DOCUMENT, postgresql_using="gin"),
    # The dispatch hot path: the next pending task by priority, oldest first.
    Index(
        "ix_tasks_pending_priority",
        Task.priority.desc(),
        Task.created_at,
        postgresql_where=text("status = 'pending'"),
    ),
    Index("ix_sessions_user_id", Session.user_id),
    Index("ix_sessions_expires_at", Session.expires_at),
    Index("ix_sessions_created_at", Session.created_at),
    Index("ix_sessions_data", Session.data, postgresql_using="gin"),
    Index("ix_achievements_agent_id", Achievement.agent_id),
    Index("ix_achievements_type", Achievement.achievement_type),
    Index("ix_achievements_created_at", Achievement.created_at),
    Index("ix_achievements_metadata", Achievement.metadata_, postgresql_using="gin"),
)

INDEXES_003 = (
    Index(
        "ix_audit_logs_resource", AuditLog.resource_type, AuditLog.resource_id, AuditLog.timestamp
    ),
    Index("ix_audit_logs_actor", AuditLog.actor_type, AuditLog.actor_id, AuditLog.timestamp),
    Index("ix_audit_logs_action", AuditLog.action),
    Index("ix_audit_logs_timestamp", AuditLog.timestamp),
    Index("ix_audit_logs_metadata", AuditLog.metadata_, postgresql_using="gin"),
)


def _type_in(types: tuple[str, ...]) -> str:
    return "achievement_type IN ({})".format(", ".join(f"'{t}'" for t in types))


# Awarding is idempotent because the database says so, at any isolation level
# and however many workers award at once: a second row is a unique violation.
INDEXES_004 = (
    Index(
        "uq_achievements_award_once",
        Achievement.agent_id,
        Achievement.achievement_type,
        unique=True,
        postgresql_where=text(_type_in(ONE_TIME_ACHIEVEMENTS)),
    ),
    Index(
        "uq_achievements_award_per_task",
        Achievement.agent_id,
        Achievement.achievement_type,
        Achievement.metadata_["task_id"].astext,
        unique=True,
        postgresql_where=text(_type_in(PER_TASK_ACHIEVEMENTS)),
    ),
)
