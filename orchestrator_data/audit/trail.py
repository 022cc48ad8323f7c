"""The audit writer: one ``audit_logs`` row per change, in the changing transaction.

Rows are inserted on the session's own connection, right after the change
reached the database, so they commit with it, vanish with a rollback (a
savepoint's included) and a retried transaction leaves only the rows of
the attempt that committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.actor import SYSTEM, Actor
from orchestrator_data.audit.jsonsafe import json_safe
from orchestrator_data.capture.change_capture import Change, ChangeCapture
from orchestrator_data.capture.session_info import INFO_ACTOR, INFO_CORRELATION_ID

# One statement per flush, whatever the number of rows, and the server reads
# its transaction id inside the INSERT: auditing costs one round trip per
# flush. Driver-level SQL: SQLAlchemy's per-parameter processing would be
# most of the Python cost of a 1,000-row bulk. Many rows travel as one JSON
# document ([action, type, id, old, new] each), encoded by one call to the C
# encoder and parsed once by the server; WITH ORDINALITY keeps their order,
# and clock_timestamp() (the column default) keeps that order in time.
INSERT_AUDIT_ROW = (
    "INSERT INTO audit_logs (action, actor_type, actor_id, ip_address, resource_type,"
    " resource_id, old_value, new_value, metadata)"
    " VALUES (%s, %s, %s, %s::inet, %s, %s, %s::jsonb, %s::jsonb,"
    " jsonb_build_object('txid', txid_current()) || %s::jsonb)"
)
INSERT_AUDIT_ROWS = (
    "INSERT INTO audit_logs (action, actor_type, actor_id, ip_address, resource_type,"
    " resource_id, old_value, new_value, metadata)"
    " SELECT r->>0, %s, %s, %s::inet, r->>1, r->>2,"
    " NULLIF(r->3, 'null'::jsonb), NULLIF(r->4, 'null'::jsonb),"
    " jsonb_build_object('txid', txid_current()) || %s::jsonb"
    " FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e(r, n) ORDER BY n"
)


@dataclass(frozen=True)
class AuditRow:
    """One row for :func:`write_rows`; ``old`` / ``new`` are Python values,
    made JSON-safe when written. ``meta`` is the encoded ``metadata`` (the
    transaction id is added by the server)."""

    action: str
    actor: Actor
    resource_type: str
    resource_id: str | None
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    meta: str


class AuditTrail:
    """Writes one audit row per :class:`~orchestrator_data.capture.change_capture.Change`
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
            AuditRow(
                c.action,
                actor,
                c.entity,
                str(c.ident),
                c.old,
                c.new,
                # Cached: shared by every row of a flush (1,000 on a bulk update).
                _change_meta(correlation_id, "cascade" if c.cascade else "bulk" if c.bulk else ""),
            )
            for c in changes
        ]
        write_rows(session.connection(), rows)


@lru_cache(maxsize=1024)
def _change_meta(correlation_id: str | None, how: str) -> str:
    # ``how``: "" (an ORM flush), "bulk" (a bulk statement), "cascade" (done
    # by a foreign key): recorded as {"bulk": true} / {"cascade": true}.
    return metadata_json(correlation_id, {how: True} if how else None)


def actor_of(session: OrmSession) -> Actor:
    """The actor the unit of work put on ``session`` (``system`` if none)."""
    actor = session.info.get(INFO_ACTOR)
    return actor if isinstance(actor, Actor) else SYSTEM


def correlation_id_of(session: OrmSession) -> str | None:
    """The correlation id the unit of work put on ``session``, if any."""
    value = session.info.get(INFO_CORRELATION_ID)
    return value if isinstance(value, str) else None


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
) -> AuditRow:
    """One audit row for :func:`write_rows`, ``extra`` merged into its metadata."""
    return AuditRow(
        action,
        actor,
        resource_type,
        None if resource_id is None else str(resource_id),
        old,
        new,
        metadata_json(correlation_id, extra),
    )


def write_rows(connection: Connection, rows: Sequence[AuditRow]) -> None:
    """Insert audit ``rows``: one statement (per actor and metadata, which
    within a flush are always the same)."""
    if len(rows) == 1:
        row = rows[0]
        actor = row.actor
        connection.exec_driver_sql(
            INSERT_AUDIT_ROW,
            (
                row.action,
                actor.type,
                actor.id,
                actor.ip,
                row.resource_type,
                row.resource_id,
                None if row.old is None else _dumps(row.old),
                None if row.new is None else _dumps(row.new),
                row.meta,
            ),
        )
        return
    for (actor, meta), group in groupby(rows, key=lambda r: (r.actor, r.meta)):
        document = _dumps([[r.action, r.resource_type, r.resource_id, r.old, r.new] for r in group])
        connection.exec_driver_sql(
            INSERT_AUDIT_ROWS, (actor.type, actor.id, actor.ip, meta, document)
        )


def metadata_json(correlation_id: str | None, extra: Mapping[str, Any] | None) -> str:
    """The ``metadata`` document of an audit row: ``extra`` and the correlation id."""
    meta: dict[str, Any] = dict(extra or {})
    if correlation_id is not None:
        meta["correlation_id"] = correlation_id
    return _dumps(meta)


def _dumps(value: Any) -> str:
    # The C encoder takes most values as they are; json_safe converts what it
    # cannot (UUIDs, datetimes, ...). Non-string keys or NaN: convert it all.
    try:
        return json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=json_safe
        )
    except (TypeError, ValueError):
        return json.dumps(json_safe(value), separators=(",", ":"), ensure_ascii=False)
