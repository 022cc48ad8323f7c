"""The ``cache_invalidations`` table (migration 008): cache invalidations
that Redis could not take when their commit happened, kept until some process
delivers them (see ``orchestrator_data.cache.journal``).

Rows are written only while a process cannot reach its cache's Redis (inside
the committing transaction, so a row exists exactly when its commit does)
and deleted once delivered: the table is empty in normal operation.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Identity, Index, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator_data.models.base import Base


class CacheInvalidation(Base):
    __tablename__ = "cache_invalidations"
    __entity__ = "cache_invalidation"
    __table_args__ = (Index("ix_cache_invalidations_namespace", "namespace", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    #: Which cache the invalidation belongs to: its Redis (host, port,
    #: database; never credentials) and key prefix.
    namespace: Mapped[str] = mapped_column(Text, nullable=False)
    #: ``{"r": [[entity, id], ...], "g": [entity, ...], "e": [entity, ...]}``:
    #: row keys to delete, generations and epochs to bump.
    targets: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    recorded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )

    def __repr__(self) -> str:
        return f"<CacheInvalidation {self.id} {self.namespace!r}>"
