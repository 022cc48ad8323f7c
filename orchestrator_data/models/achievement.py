"""The ``achievements`` table: achievements awarded to agents, with points."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Integer, String, func
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator_data.models.base import Base, created_at, jsonb_object, uuid_pk

#: Achievements an agent earns at most once (unique per agent, migration 004).
ONE_TIME_ACHIEVEMENTS = ("first_task", "tasks_10", "tasks_100")
#: Achievements earned again and again, at most once per task that triggered
#: them (``metadata.task_id``; unique per agent and task, migration 004).
PER_TASK_ACHIEVEMENTS = ("completion_streak", "fast_completion")


class Achievement(Base):
    __tablename__ = "achievements"
    __entity__ = "achievement"
    __renamed__ = {"metadata_": "metadata"}
    __table_args__ = (CheckConstraint("points >= 0", name="points"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    agent_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("agents.id", ondelete="CASCADE"), nullable=False
    )
    achievement_type: Mapped[str] = mapped_column(String(100), nullable=False)
    points: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    completed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    metadata_: Mapped[dict[str, Any]] = jsonb_object("metadata")
    created_at: Mapped[datetime] = created_at()

    def __repr__(self) -> str:
        return f"<Achievement {self.achievement_type} agent={self.agent_id} +{self.points}>"
