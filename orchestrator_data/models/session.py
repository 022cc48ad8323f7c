"""The ``sessions`` table: the durable copy of the Redis session store.

For sessions of the store, ``session_key`` holds the SHA-256 (hex) of the
session's key, never the key itself; ``version`` is the store's
compare-and-set counter, so a write of the durable copy lands only if it is
newer than the one already there (see ``orchestrator_data.coordination.sessions``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, String, Text, text
from sqlalchemy.dialects.postgresql import INET
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator_data.models.base import Base, created_at, jsonb_object, updated_at, uuid_pk


class Session(Base):
    __tablename__ = "sessions"
    __entity__ = "session"

    id: Mapped[uuid.UUID] = uuid_pk()
    session_key: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    user_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    data: Mapped[dict[str, Any]] = jsonb_object()
    ip_address: Mapped[str | None] = mapped_column(INET, nullable=True)
    user_agent: Mapped[str | None] = mapped_column(Text, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: Bumped by every update of the session's data (migration 007).
    version: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=1, server_default=text("1")
    )
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user_id!r}>"
