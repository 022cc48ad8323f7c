"""The ``agents`` table: agent profiles, capabilities and status."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.mutable import MutableList
from sqlalchemy.orm import Mapped, mapped_column

from orchestrator_data.models.base import Base, created_at, jsonb_object, updated_at, uuid_pk

AGENT_STATUSES = ("idle", "active", "busy", "offline", "error")


class Agent(Base):
    __tablename__ = "agents"
    __entity__ = "agent"
    __renamed__ = {"metadata_": "metadata"}
    __table_args__ = (
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in AGENT_STATUSES)),
            name="status",
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    role: Mapped[str] = mapped_column(String(100), nullable=False)
    status: Mapped[str] = mapped_column(
        String(50), nullable=False, default="idle", server_default="idle"
    )
    capabilities: Mapped[list[Any]] = mapped_column(
        MutableList.as_mutable(JSONB), nullable=False, default=list, server_default="[]"
    )
    metadata_: Mapped[dict[str, Any]] = jsonb_object("metadata")
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = updated_at()

    def __repr__(self) -> str:
        return f"<Agent {self.id} {self.name!r} {self.status}>"
