"""Agents: CRUD plus queries by role, status and capability, and full-text search."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, func, literal_column, select

from orchestrator_data.models import AGENT_SEARCH_DOCUMENT, Agent
from orchestrator_data.pagination import Page
from orchestrator_data.repositories import _checks
from orchestrator_data.repositories.base import Repository
from orchestrator_data.schemas import AgentSchema


class AgentRepository(Repository[Agent]):
    """Filters: ``role``, ``status``, ``capability`` (one, or a list: all of them),
    ``name``, ``created_after``, ``created_before``."""

    model_type = Agent
    schema_type = AgentSchema
    sortable = frozenset({"created_at", "name", "updated_at"})

    def by_role(self, role: str, **kw: Any) -> Page[Agent]:
        return self.list(role=role, **kw)

    def by_status(self, status: str, **kw: Any) -> Page[Agent]:
        return self.list(status=status, **kw)

    def with_capability(self, *capabilities: str, **kw: Any) -> Page[Agent]:
        """Agents that have every one of ``capabilities`` (JSONB containment, GIN-indexed)."""
        return self.list(capability=list(capabilities), **kw)

    def get_by_name(self, name: str, *, cached: bool | None = None) -> Agent | None:
        _checks.optional_boolean("cached", cached)
        clauses = self._where({"name": name})

        def load() -> tuple[list[Agent], str | None]:
            found = self.session.scalars(select(Agent).where(*clauses)).first()
            return ([found] if found is not None else []), None

        rows, _ = self._rows(("by_name", name), load, cached)
        return rows[0] if rows else None

    def search(self, query: str, *, limit: int = 20, cached: bool | None = None) -> list[Agent]:
        """Agents whose name or role matches ``query`` (full text, best match first)."""
        _checks.text("query", query, 1000)
        _checks.integer("limit", limit, 1, 1000)
        _checks.optional_boolean("cached", cached)
        rows, _ = self._rows(("search", query, limit), lambda: self._search(query, limit), cached)
        return rows

    def _search(self, query: str, limit: int) -> tuple[list[Agent], None]:
        tsquery = func.plainto_tsquery(literal_column("'simple'::regconfig"), query)
        stmt = (
            self._select({})
            .where(AGENT_SEARCH_DOCUMENT.op("@@")(tsquery))
            .order_by(func.ts_rank(AGENT_SEARCH_DOCUMENT, tsquery).desc(), Agent.id)
            .limit(limit)
        )
        return list(self.session.scalars(stmt)), None

    def _filter(self, name: str, value: Any) -> ColumnElement[bool] | None:
        if name in ("role", "status", "name"):
            return self._equals(getattr(Agent, name), name, value)
        if name == "capability":
            # One capability or a list; checked as the capabilities field checks them.
            wanted = self._check(name, _checks.values(value), "capabilities")
            return Agent.capabilities.contains(wanted)
        return super()._filter(name, value)
