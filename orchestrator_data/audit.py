"""The audit writer: one ``audit_logs`` row per change, in the changing transaction.

Rows are inserted on the session's own connection, right after the change
reached the database, so they commit with it, vanish with a rollback (a
savepoint's included) and a retried transaction leaves only the rows of
the attempt that committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.actor import SYSTEM, Actor
from orchestrator_data.changes import Change, ChangeCapture
from orchestrator_data.jsonsafe import json_safe
from orchestrator_data.models import AuditLog, Base
from orchestrator_data.uow import INFO_ACTOR, INFO_CORRELATION_ID

# Python None must become SQL NULL (no old value on create), not JSON null.
_JSONB_OR_NULL = JSONB(none_as_null=True)

# One statement for every audit row. The transaction id is read by the server
# inside the INSERT itself: no extra round trip per flush. Given a list of
# rows, psycopg2's "insertmanyvalues" sends them as one multi-row INSERT.
INSERT_AUDIT_ROWS = insert(Base.metadata.tables[AuditLog.__tablename__]).values(
    old_value=bindparam("old", type_=_JSONB_OR_NULL),
    new_value=bindparam("new", type_=_JSONB_OR_NULL),
    metadata=func.jsonb_build_object("txid", func.txid_current()).op("||")(
        bindparam("meta", type_=JSONB)
    ),
)


class AuditTrail:
    """Writes one audit row per :class:`~orchestrator_data.changes.Change`
    that ``changes`` captures, in the same transaction: actor and correlation
    id from the unit of work, ``old`` / ``new`` as captured (full row on
    create and delete, changed fields on update), the server's transaction
    id in ``metadata``.
    """

    def __init__(self, changes: ChangeCapture) -> None:
        changes.on_flush(self.record, values=True)

    def record(self, session: OrmSession, changes: Sequence[Change]) -> None:
        """Insert the audit rows of ``changes`` (one statement). Called by the
        change capture right after they reached the database."""
        actor = actor_of(session)
        correlation_id = correlation_id_of(session)
        rows = [
            audit_row(
                action=change.action,
                actor=actor,
                resource_type=change.entity,
                resource_id=change.ident,
                old=change.old,
                new=change.new,
                correlation_id=correlation_id,
                extra=_BULK if change.bulk else None,
            )
            for change in changes
        ]
        write_rows(session.connection(), rows)


_BULK = {"bulk": True}


def actor_of(session: OrmSession) -> Actor:
    """The actor the unit of work put on ``session`` (``system`` if none)."""
    actor = session.info.get(INFO_ACTOR)
    return actor if isinstance(actor, Actor) else SYSTEM


def audit_row(
    *,
    action: str,
    actor: Actor,
    resource_type: str,
    resource_id: object | None,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    correlation_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The parameters of one audit row for :data:`INSERT_AUDIT_ROWS`, values JSON-safe."""
    meta: dict[str, Any] = dict(json_safe(extra) if extra else {})
    if correlation_id is not None:
        meta["correlation_id"] = correlation_id
    return {
        "action": action,
        "actor_type": actor.type,
        "actor_id": actor.id,
        "ip_address": actor.ip,
        "resource_type": resource_type,
        "resource_id": None if resource_id is None else str(resource_id),
        "old": None if old is None else json_safe(old),
        "new": None if new is None else json_safe(new),
        "meta": meta,
    }


def write_rows(connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert audit ``rows`` (from :func:`audit_row`) in one statement."""
    if rows:
        connection.execute(INSERT_AUDIT_ROWS, list(rows))


def correlation_id_of(session: OrmSession) -> str | None:
    """The correlation id the unit of work put on ``session``, if any."""
    value = session.info.get(INFO_CORRELATION_ID)
    return value if isinstance(value, str) else None
