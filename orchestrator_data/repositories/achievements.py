"""Achievements of agents, and points totals."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any

from sqlalchemy import ColumnElement, func, select

from orchestrator_data.models import Achievement, Agent
from orchestrator_data.repositories import _checks
from orchestrator_data.repositories.base import Repository, coerce_uuid
from orchestrator_data.schemas import AchievementSchema


class AchievementRepository(Repository[Achievement]):
    """Filters: ``agent_id``, ``achievement_type``, ``created_after``, ``created_before``."""

    model_type = Achievement
    schema_type = AchievementSchema
    sortable = frozenset({"created_at", "points", "completed_at"})

    def points_of(self, agent_id: uuid.UUID | str) -> int:
        """Total points awarded to ``agent_id`` (0 when none)."""
        stmt = select(func.coalesce(func.sum(Achievement.points), 0)).where(
            Achievement.agent_id == coerce_uuid(agent_id, "agent_id")
        )
        return int(self.session.scalar(stmt) or 0)

    def leaderboard(
        self, *, limit: int = 10, agent_ids: Collection[uuid.UUID | str] | None = None
    ) -> list[tuple[uuid.UUID, str, int]]:
        """``(agent_id, agent name, total points)``, most points first (ties
        by name); among ``agent_ids`` only, when given."""
        _checks.integer("limit", limit, 1, 1000)
        total = func.sum(Achievement.points).label("points")
        stmt = (
            select(Agent.id, Agent.name, total)
            .join(Achievement, Achievement.agent_id == Agent.id)
            .group_by(Agent.id, Agent.name)
            .order_by(total.desc(), Agent.name)
            .limit(limit)
        )
        if agent_ids is not None:
            ids = [coerce_uuid(i, "agent_ids") for i in _checks.values(agent_ids)]
            stmt = stmt.where(Agent.id.in_(ids))
        return [(row[0], row[1], int(row[2])) for row in self.session.execute(stmt)]

    def _filter(self, name: str, value: Any) -> ColumnElement[bool] | None:
        if name == "agent_id":
            return self._equals(Achievement.agent_id, name, value)
        if name == "achievement_type":
            return self._equals(Achievement.achievement_type, name, value)
        return super()._filter(name, value)
