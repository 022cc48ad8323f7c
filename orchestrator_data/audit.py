"""The audit writer: one ``audit_logs`` row per change, in the changing transaction.

Rows are inserted on the session's own connection, right after the change
reached the database, so they commit with it, vanish with a rollback (a
savepoint's included) and a retried transaction leaves only the rows of
the attempt that committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.actor import SYSTEM, Actor
from orchestrator_data.changes import Change, ChangeCapture
from orchestrator_data.jsonsafe import json_safe
from orchestrator_data.uow import INFO_ACTOR, INFO_CORRELATION_ID

# One statement for every audit row of a flush, whatever their number, and
# the server reads its transaction id inside the INSERT: auditing costs one
# round trip per flush. Driver-level SQL, because SQLAlchemy's per-parameter
# processing is most of the Python cost of a 1,000-row bulk. Several rows
# travel as nine arrays (quoted by psycopg2 in C); unnest keeps their order,
# and clock_timestamp() (the column default) keeps that order in time. One
# row takes the plain VALUES form, which the server plans faster.
INSERT_AUDIT_ROW = (
    "INSERT INTO audit_logs (action, actor_type, actor_id, ip_address, resource_type,"
    " resource_id, old_value, new_value, metadata)"
    " VALUES (%s, %s, %s, %s::inet, %s, %s, %s::jsonb, %s::jsonb,"
    " jsonb_build_object('txid', txid_current()) || %s::jsonb)"
)
INSERT_AUDIT_ROWS = (
    "INSERT INTO audit_logs (action, actor_type, actor_id, ip_address, resource_type,"
    " resource_id, old_value, new_value, metadata)"
    " SELECT a, t, i, ip::inet, rt, ri, o, n, jsonb_build_object('txid', txid_current()) || m"
    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
    " %s::jsonb[], %s::jsonb[], %s::jsonb[]) AS r(a, t, i, ip, rt, ri, o, n, m)"
)
_FIELDS = (
    "action",
    "actor_type",
    "actor_id",
    "ip_address",
    "resource_type",
    "resource_id",
    "old",
    "new",
    "meta",
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
        # Encoded once per flush, shared by every row (1,000 on a bulk update).
        meta = _meta_json(correlation_id, None)
        bulk_meta = _meta_json(correlation_id, _BULK)
        rows = [
            _row(
                change.action,
                actor,
                change.entity,
                str(change.ident),
                change.old,
                change.new,
                bulk_meta if change.bulk else meta,
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
    """One audit row for :func:`write_rows`: JSON values already encoded."""
    return _row(
        action,
        actor,
        resource_type,
        None if resource_id is None else str(resource_id),
        old,
        new,
        _meta_json(correlation_id, extra),
    )


def _meta_json(correlation_id: str | None, extra: Mapping[str, Any] | None) -> str:
    meta: dict[str, Any] = dict(extra or {})
    if correlation_id is not None:
        meta["correlation_id"] = correlation_id
    return _dumps(meta)


def _row(
    action: str,
    actor: Actor,
    resource_type: str,
    resource_id: str | None,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    meta_json: str,
) -> dict[str, Any]:
    return {
        "action": action,
        "actor_type": actor.type,
        "actor_id": actor.id,
        "ip_address": actor.ip,
        "resource_type": resource_type,
        "resource_id": resource_id,
        # None stays SQL NULL (no old value on create), not JSON null.
        "old": None if old is None else _dumps(old),
        "new": None if new is None else _dumps(new),
        "meta": meta_json,
    }


def write_rows(connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert audit ``rows`` (from :func:`audit_row`) in one statement."""
    if len(rows) == 1:
        connection.exec_driver_sql(INSERT_AUDIT_ROW, tuple(rows[0][f] for f in _FIELDS))
    elif rows:
        columns = tuple([row[field] for row in rows] for field in _FIELDS)
        connection.exec_driver_sql(INSERT_AUDIT_ROWS, columns)


def _dumps(value: Any) -> str:
    # json_safe only for what the C encoder cannot take itself (UUIDs,
    # datetimes, ...): most values are plain JSON already.
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=json_safe
    )


def correlation_id_of(session: OrmSession) -> str | None:
    """The correlation id the unit of work put on ``session``, if any."""
    value = session.info.get(INFO_CORRELATION_ID)
    return value if isinstance(value, str) else None
