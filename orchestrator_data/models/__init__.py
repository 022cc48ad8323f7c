"""Declarative models of the tables (the five of the design, and the cache's
invalidation log); importing this registers every table and index on
``Base.metadata``.

May import: nothing.
"""

from orchestrator_data.models.achievement import (
    ONE_TIME_ACHIEVEMENTS,
    PER_TASK_ACHIEVEMENTS,
    Achievement,
)
from orchestrator_data.models.agent import AGENT_STATUSES, Agent
from orchestrator_data.models.audit_log import AUDIT_ACTIONS, AuditLog
from orchestrator_data.models.base import Base, to_dict
from orchestrator_data.models.cache_invalidation import CacheInvalidation
from orchestrator_data.models.indexes import AGENT_SEARCH_DOCUMENT, TASK_SEARCH_DOCUMENT
from orchestrator_data.models.lock_fence import LockFence
from orchestrator_data.models.session import Session
from orchestrator_data.models.task import PRIORITY_MAX, PRIORITY_MIN, TASK_STATUSES, Task

#: What an audit row's ``resource_type`` can be: every entity (``audit_log``
#: for the rows that retention writes about itself).
RESOURCE_TYPES: tuple[str, ...] = tuple(
    sorted(model.__entity__ for model in (Achievement, Agent, AuditLog, Session, Task))
)

__all__ = [
    "AGENT_SEARCH_DOCUMENT",
    "AGENT_STATUSES",
    "AUDIT_ACTIONS",
    "ONE_TIME_ACHIEVEMENTS",
    "PER_TASK_ACHIEVEMENTS",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "RESOURCE_TYPES",
    "TASK_SEARCH_DOCUMENT",
    "TASK_STATUSES",
    "Achievement",
    "Agent",
    "AuditLog",
    "Base",
    "CacheInvalidation",
    "LockFence",
    "Session",
    "Task",
    "to_dict",
]
