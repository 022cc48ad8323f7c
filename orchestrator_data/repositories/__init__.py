"""Repositories, one per entity, over a generic typed base.

May import: ``cache``, ``errors``, ``models``, ``pagination``, ``schemas``.
"""

from orchestrator_data.repositories.achievements import AchievementRepository
from orchestrator_data.repositories.agents import AgentRepository
from orchestrator_data.repositories.audit import AuditLogRepository
from orchestrator_data.repositories.base import Repository
from orchestrator_data.repositories.sessions import SessionRepository
from orchestrator_data.repositories.tasks import TaskRepository

__all__ = [
    "AchievementRepository",
    "AgentRepository",
    "AuditLogRepository",
    "Repository",
    "SessionRepository",
    "TaskRepository",
]
