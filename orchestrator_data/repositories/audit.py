"""The audit trail, read-only: rows are written by the audit hooks alone."""

from __future__ import annotations

from typing import Any, NoReturn, cast

from sqlalchemy import ColumnElement

from orchestrator_data.errors import OrchestratorDataError
from orchestrator_data.models import AUDIT_ACTIONS, AuditLog
from orchestrator_data.pagination import Page
from orchestrator_data.repositories import _checks
from orchestrator_data.repositories.base import Repository
from orchestrator_data.schemas import AuditLogSchema


class AuditLogRepository(Repository[AuditLog]):
    """Filters: ``resource_type``, ``resource_id``, ``actor_type``, ``actor_id``,
    ``action``, ``since``, ``until``. Ordered by ``timestamp``."""

    model_type = AuditLog
    schema_type = AuditLogSchema
    sortable = frozenset({"timestamp"})
    default_order = "timestamp"

    def history(self, resource_type: str, resource_id: str, **kw: Any) -> Page[AuditLog]:
        """Every change to one resource, oldest first."""
        return self.list(resource_type=resource_type, resource_id=str(resource_id), **kw)

    def by_actor(self, actor_type: str, actor_id: str | None = None, **kw: Any) -> Page[AuditLog]:
        return self.list(actor_type=actor_type, actor_id=actor_id, **kw)

    def create(self, **fields: Any) -> NoReturn:
        raise OrchestratorDataError("audit rows are written by the audit hooks, not by callers")

    def update(self, ident: Any, **fields: Any) -> NoReturn:
        raise OrchestratorDataError("audit_logs is append-only")

    def delete(self, ident: Any) -> NoReturn:
        raise OrchestratorDataError("audit_logs is append-only")

    def _filter(self, name: str, value: Any) -> ColumnElement[bool] | None:
        if name in ("resource_type", "resource_id", "actor_type", "actor_id"):
            column = getattr(AuditLog, name)
            clause: ColumnElement[bool] = column == _checks.text(name, str(value))
            return clause
        if name == "action":
            return AuditLog.action == _checks.one_of(name, value, AUDIT_ACTIONS)
        if name == "since":
            return cast("ColumnElement[bool]", AuditLog.timestamp >= value)
        if name == "until":
            return cast("ColumnElement[bool]", AuditLog.timestamp < value)
        return None
