"""Tasks: CRUD plus queries by status, type, priority range and agent,
full-text search, and the claim of the next pending task."""

from __future__ import annotations

import uuid
from typing import Any, cast

from sqlalchemy import ColumnElement, func, literal_column, select

from orchestrator_data.models import PRIORITY_MAX, PRIORITY_MIN, TASK_SEARCH_DOCUMENT, Task
from orchestrator_data.pagination import Page
from orchestrator_data.repositories import _checks
from orchestrator_data.repositories.base import Repository, coerce_uuid
from orchestrator_data.schemas import TaskSchema


class TaskRepository(Repository[Task]):
    """Filters: ``status`` (one or a list), ``type``, ``agent_id``,
    ``priority_min``, ``priority_max``, ``created_after``, ``created_before``."""

    model_type = Task
    schema_type = TaskSchema
    sortable = frozenset({"created_at", "priority", "updated_at"})

    def by_status(self, status: str, **kw: Any) -> Page[Task]:
        return self.list(status=status, **kw)

    def by_priority(
        self, low: int = PRIORITY_MIN, high: int = PRIORITY_MAX, **kw: Any
    ) -> Page[Task]:
        return self.list(priority_min=low, priority_max=high, **kw)

    def search(
        self, query: str, *, limit: int = 20, cached: bool | None = None, **filters: Any
    ) -> list[Task]:
        """Tasks whose type or payload strings match ``query`` (full text)."""
        _checks.text("query", query, 1000)
        _checks.integer("limit", limit, 1, 1000)
        _checks.optional_boolean("cached", cached)
        clauses = self._where(filters)
        rows, _ = self._rows(
            ("search", query, limit, filters), lambda: self._search(query, limit, clauses), cached
        )
        return rows

    def _search(
        self, query: str, limit: int, clauses: list[ColumnElement[bool]]
    ) -> tuple[list[Task], None]:
        tsquery = func.plainto_tsquery(literal_column("'simple'::regconfig"), query)
        stmt = (
            select(Task)
            .where(*clauses)
            .where(TASK_SEARCH_DOCUMENT.op("@@")(tsquery))
            .order_by(func.ts_rank(TASK_SEARCH_DOCUMENT, tsquery).desc(), Task.id)
            .limit(limit)
        )
        return list(self.session.scalars(stmt)), None

    def claim_next(
        self, agent_id: uuid.UUID | str, *, types: list[str] | None = None
    ) -> Task | None:
        """Assign the highest-priority, oldest pending task to ``agent_id``.

        ``FOR UPDATE SKIP LOCKED`` lets many workers claim at once without
        blocking on each other; the partial index on pending tasks serves it.
        """
        agent = coerce_uuid(agent_id, "agent_id")
        wanted = None if types is None else self._check_each("types", types, "type")
        stmt = (
            select(Task)
            .where(Task.status == "pending")
            .order_by(Task.priority.desc(), Task.created_at, Task.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if wanted:
            stmt = stmt.where(Task.type.in_(wanted))
        task = self.session.scalars(stmt).first()
        if task is None:
            return None
        task.status = "assigned"
        task.agent_id = agent
        self.session.flush()
        return task

    def _filter(self, name: str, value: Any) -> ColumnElement[bool] | None:
        if name == "status":
            statuses = self._check_each(name, value)
            if len(statuses) == 1:
                return Task.status == str(statuses[0])
            return Task.status.in_(statuses)
        if name == "type":
            return self._equals(Task.type, name, value)
        if name == "agent_id":
            return self._equals(Task.agent_id, name, value)
        if name == "priority_min":
            return cast(
                "ColumnElement[bool]", Task.priority >= self._check(name, value, "priority")
            )
        if name == "priority_max":
            return cast(
                "ColumnElement[bool]", Task.priority <= self._check(name, value, "priority")
            )
        return super()._filter(name, value)
