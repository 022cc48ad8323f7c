"""marshmallow schemas: validation at the repository boundary, and serialization.

``schemas.rules`` is the one rule set (standard library only, so the Actor
and the cursors can use it without loading SQLAlchemy); the schemas, loaded
on first use, apply it field by field.

May import: ``errors``, ``models``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator_data.schemas.achievement import AchievementSchema
    from orchestrator_data.schemas.agent import AgentSchema
    from orchestrator_data.schemas.audit_log import AuditLogSchema
    from orchestrator_data.schemas.base import EntitySchema, load
    from orchestrator_data.schemas.session import SessionSchema
    from orchestrator_data.schemas.task import TaskSchema

# Loaded on first access: importing ``schemas.rules`` must not load marshmallow
# or the models.
_LAZY = {
    "AchievementSchema": "orchestrator_data.schemas.achievement",
    "AgentSchema": "orchestrator_data.schemas.agent",
    "AuditLogSchema": "orchestrator_data.schemas.audit_log",
    "EntitySchema": "orchestrator_data.schemas.base",
    "SessionSchema": "orchestrator_data.schemas.session",
    "TaskSchema": "orchestrator_data.schemas.task",
    "load": "orchestrator_data.schemas.base",
}

__all__ = [
    "AchievementSchema",
    "AgentSchema",
    "AuditLogSchema",
    "EntitySchema",
    "SessionSchema",
    "TaskSchema",
    "load",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
