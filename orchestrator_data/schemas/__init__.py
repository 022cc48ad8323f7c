"""marshmallow schemas: validation at the repository boundary, and serialization.

May import: ``errors``, ``models``.
"""

from orchestrator_data.schemas.achievement import AchievementSchema
from orchestrator_data.schemas.agent import AgentSchema
from orchestrator_data.schemas.audit_log import AuditLogSchema
from orchestrator_data.schemas.base import EntitySchema, load
from orchestrator_data.schemas.session import SessionSchema
from orchestrator_data.schemas.task import TaskSchema

__all__ = [
    "AchievementSchema",
    "AgentSchema",
    "AuditLogSchema",
    "EntitySchema",
    "SessionSchema",
    "TaskSchema",
    "load",
]
