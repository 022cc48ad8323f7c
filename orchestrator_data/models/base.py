"""The one declarative ``Base`` and the column helpers every model shares."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import DateTime, MetaData, func, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# A naming convention makes constraint names deterministic, so alembic can
# drop and compare them by name across databases.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of all orchestrator_data models."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Fetch server-generated values (updated_at, defaults) with RETURNING at
    # flush, so objects stay readable after their unit of work has closed.
    __mapper_args__ = {"eager_defaults": True}

    #: Name of the entity in cache keys, audit rows and error messages.
    __entity__: ClassVar[str]
    #: Model attribute name -> public field name, where they differ.
    __renamed__: ClassVar[dict[str, str]] = {}


def uuid_pk() -> Mapped[uuid.UUID]:
    """A UUID primary key generated client-side (so it is known before flush)
    with a server default for rows inserted by plain SQL."""
    return mapped_column(
        UUID(as_uuid=True),
        primary_key=True,
        default=uuid.uuid4,
        server_default=text("gen_random_uuid()"),
    )


# clock_timestamp(), not now(): rows written by one transaction keep the order
# they were written in (FIFO dispatch and history depend on it).
def created_at() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )


def updated_at() -> Mapped[datetime]:
    # onupdate applies to ORM flushes and to ORM-enabled bulk update() alike.
    return mapped_column(
        DateTime(timezone=True),
        nullable=False,
        server_default=func.clock_timestamp(),
        onupdate=func.clock_timestamp(),
    )


def jsonb_object(column_name: str | None = None) -> Mapped[dict[str, Any]]:
    """A NOT NULL JSONB object column, ``{}`` by default, whose in-place
    changes (``obj.metadata_["k"] = v``) are tracked and flushed."""
    column = MutableDict.as_mutable(JSONB)
    kwargs: dict[str, Any] = {"nullable": False, "default": dict, "server_default": "{}"}
    if column_name is None:
        return mapped_column(column, **kwargs)
    return mapped_column(column_name, column, **kwargs)


def to_dict(obj: Base) -> dict[str, Any]:
    """Column values of ``obj`` keyed by their public field names."""
    renamed = type(obj).__renamed__
    out: dict[str, Any] = {}
    for attr in obj.__mapper__.column_attrs:
        out[renamed.get(attr.key, attr.key)] = getattr(obj, attr.key)
    return out
