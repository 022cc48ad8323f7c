"""The unit of work: one Session, one transaction, and the repositories on it.

Leaving the ``with`` block without :meth:`UnitOfWork.commit` rolls back.
Repositories flush but never commit.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.actor import Actor
from orchestrator_data.capture.session_info import (
    INFO_ACTOR,
    INFO_CORRELATION_ID,
    INFO_ISOLATION,
    INFO_READ_ONLY,
)
from orchestrator_data.errors import LockLostError
from orchestrator_data.repositories import (
    AchievementRepository,
    AgentRepository,
    AuditLogRepository,
    SessionRepository,
    TaskRepository,
)
from orchestrator_data.repositories.fences import record_fence

if TYPE_CHECKING:
    from orchestrator_data.coordination.outbox import UnitOfWorkEvents


class Fenced(Protocol):
    """What :meth:`UnitOfWork.fence` needs of a lock: its name and token."""

    @property
    def name(self) -> str: ...

    @property
    def fence(self) -> int | None: ...


class UnitOfWork:
    """A transaction in progress. ``session`` is its SQLAlchemy Session, for
    statements the repositories do not cover (audited and cache-invalidating
    like the rest)."""

    def __init__(
        self,
        session: OrmSession,
        *,
        actor: Actor,
        isolation: str,
        read_only: bool,
        correlation_id: str | None = None,
    ) -> None:
        self.session = session
        self.actor = actor
        self.correlation_id = correlation_id
        self.isolation = isolation
        self.read_only = read_only
        self.committed = False
        session.info[INFO_ACTOR] = actor
        session.info[INFO_READ_ONLY] = read_only
        session.info[INFO_ISOLATION] = isolation
        session.info[INFO_CORRELATION_ID] = correlation_id

    @cached_property
    def agents(self) -> AgentRepository:
        return AgentRepository(session=self.session)

    @cached_property
    def tasks(self) -> TaskRepository:
        return TaskRepository(session=self.session)

    @cached_property
    def sessions(self) -> SessionRepository:
        return SessionRepository(session=self.session)

    @cached_property
    def achievements(self) -> AchievementRepository:
        return AchievementRepository(session=self.session)

    @cached_property
    def audit(self) -> AuditLogRepository:
        return AuditLogRepository(session=self.session)

    @cached_property
    def events(self) -> UnitOfWorkEvents:
        """``uow.events.publish(channel, payload)``: sent after the commit, dropped on rollback."""
        from orchestrator_data.coordination.outbox import outbox

        return outbox(self.session)

    def fence(self, lock: Fenced | str, token: int | None = None) -> int:
        """Record the fencing token of ``lock`` (a held ``dl.lock(...)``, or a
        lock name and its ``token``) in this transaction, so that it
        commits only if no later holder of the lock has fenced a write:
        :class:`~orchestrator_data.LockLostError` otherwise. Call it before
        the writes the lock protects; returns the token."""
        if isinstance(lock, str):
            name, value = lock, token
        else:
            name, value = lock.name, lock.fence if token is None else token
        if value is None:
            raise LockLostError(f"lock {name!r} has no fencing token: acquire it first")
        return record_fence(self.session, name, value)

    def commit(self) -> None:
        """Commit the transaction. Work after a commit starts a new transaction
        in the same unit of work, at the same isolation level."""
        self.session.commit()
        self.committed = True

    def rollback(self) -> None:
        """Discard everything done since the last commit."""
        self.session.rollback()
