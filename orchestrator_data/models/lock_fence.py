"""The ``lock_fences`` table: the highest fencing token recorded per lock name.

Written by ``uow.fence(lock)`` in the unit of work's transaction: a holder
whose token is lower than one already recorded has lost its lock, and its
transaction is refused. Coordination metadata, not audited.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, String, func
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator_data.models.base import Base

#: Longest lock name (as ``orchestrator_data.coordination.keys.MAX_NAME``).
LOCK_NAME_LENGTH = 200


class LockFence(Base):
    __tablename__ = "lock_fences"
    __entity__ = "lock_fence"

    name: Mapped[str] = mapped_column(String(LOCK_NAME_LENGTH), primary_key=True)
    token: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now()
    )

    def __repr__(self) -> str:
        return f"<LockFence {self.name!r} {self.token}>"
