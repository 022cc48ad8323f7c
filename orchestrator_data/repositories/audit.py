"""The audit trail, read-only: rows are written by the audit hooks alone."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NoReturn, cast

from sqlalchemy import ColumnElement

from orchestrator_data.errors import OrchestratorDataError
from orchestrator_data.models import AUDIT_ACTIONS, RESOURCE_TYPES, AuditLog
from orchestrator_data.pagination import Page
from orchestrator_data.repositories import _checks
from orchestrator_data.repositories.base import Repository
from orchestrator_data.schemas import AuditLogSchema


class AuditLogRepository(Repository[AuditLog]):
    """Filters: ``resource_type``, ``resource_id``, ``actor_type``, ``actor_id``,
    ``action``, ``since``, ``until``, ``txid``, ``correlation_id``. Ordered by
    ``timestamp`` (then ``id``); every query pages with ``limit`` / ``after``."""

    model_type = AuditLog
    schema_type = AuditLogSchema
    sortable = frozenset({"timestamp"})
    default_order = "timestamp"

    def history(self, resource_type: str | None, resource_id: object, **kw: Any) -> Page[AuditLog]:
        """Every change to one resource, oldest first (``resource_type`` ``None``:
        whatever the type, for an id alone)."""
        return self.list(resource_type=resource_type, resource_id=str(resource_id), **kw)

    def by_actor(self, actor_type: str, actor_id: str | None = None, **kw: Any) -> Page[AuditLog]:
        """What one actor (or every actor of a type, when ``actor_id`` is None) did."""
        return self.list(actor_type=actor_type, actor_id=actor_id, **kw)

    def by_action(self, action: str, **kw: Any) -> Page[AuditLog]:
        """Rows of one action (``create``, ``update``, ``delete``, ``prune``)."""
        return self.list(action=action, **kw)

    def between(
        self, since: datetime | None = None, until: datetime | None = None, **kw: Any
    ) -> Page[AuditLog]:
        """Rows written at or after ``since`` and before ``until`` (either may be open)."""
        return self.list(since=since, until=until, **kw)

    def create(self, **fields: Any) -> NoReturn:
        raise OrchestratorDataError("audit rows are written by the audit hooks, not by callers")

    def update(self, ident: Any, **fields: Any) -> NoReturn:
        raise OrchestratorDataError("audit_logs is append-only")

    def delete(self, ident: Any) -> NoReturn:
        raise OrchestratorDataError("audit_logs is append-only")

    def _filter(self, name: str, value: Any) -> ColumnElement[bool] | None:
        if name == "resource_type":
            return AuditLog.resource_type == _checks.one_of(name, value, RESOURCE_TYPES)
        if name in ("resource_id", "actor_type", "actor_id"):
            if name == "resource_id" and isinstance(value, uuid.UUID):
                value = str(value)
            return self._equals(getattr(AuditLog, name), name, value)
        if name == "action":
            return AuditLog.action == _checks.one_of(name, value, AUDIT_ACTIONS)
        if name == "since":
            return cast(
                "ColumnElement[bool]", AuditLog.timestamp >= self._check(name, value, "timestamp")
            )
        if name == "until":
            return cast(
                "ColumnElement[bool]", AuditLog.timestamp < self._check(name, value, "timestamp")
            )
        if name == "txid":
            _checks.integer(name, value, 1, 2**63 - 1)
            return AuditLog.metadata_.contains({"txid": value})
        if name == "correlation_id":
            return AuditLog.metadata_.contains({"correlation_id": _checks.text(name, value)})
        return None
