"""Retention of the audit trail: the one way rows leave ``audit_logs``.

The append-only trigger lets a DELETE through only when it runs as the
role ``orchestrator_data_retention``, which only the ``SECURITY DEFINER``
function ``prune_audit_logs`` does (migration 005): it deletes the rows
older than its cutoff and writes its own ``prune`` row, in one statement.
No setting a session can change opens the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text

from orchestrator_data.audit.trail import actor_of, correlation_id_of, metadata_json
from orchestrator_data.errors import ValidationError
from orchestrator_data.uow import UnitOfWork

_PRUNE = text(
    "SELECT deleted, cutoff, oldest, newest FROM "
    "prune_audit_logs(:age, :actor_type, :actor_id, CAST(:ip AS inet), CAST(:meta AS jsonb))"
)


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_audit_log` removed: ``deleted`` rows written before
    ``cutoff``, the oldest and newest of them (``None`` when nothing went)."""

    deleted: int
    cutoff: datetime
    oldest: datetime | None
    newest: datetime | None


def prune_audit_log(uow: UnitOfWork, older_than: timedelta) -> PruneResult:
    """Delete the audit rows older than ``older_than`` in ``uow``'s transaction,
    and write a ``prune`` audit row saying how many and which span. The caller
    commits. The prune row itself is never older than the cutoff."""
    if older_than <= timedelta(0):
        raise ValidationError({"older_than": ["Must be a positive duration."]})
    session = uow.session
    session.flush()
    actor = actor_of(session)
    meta = metadata_json(correlation_id_of(session), None)
    # On the connection: the session's guard has nothing to check in a
    # function call, and the function does the writing.
    deleted, cutoff, oldest, newest = (
        session.connection()
        .execute(
            _PRUNE,
            {
                "age": older_than,
                "actor_type": actor.type,
                "actor_id": actor.id,
                "ip": actor.ip,
                "meta": meta,
            },
        )
        .one()
    )
    return PruneResult(int(deleted), cutoff, oldest, newest)
