"""Retention of the audit trail: the one way rows leave ``audit_logs``.

The append-only trigger (migration 003) lets a DELETE through only in a
transaction that ran ``SET LOCAL orchestrator_data.audit_prune = 'on'``;
:func:`prune_audit_log` does exactly that and records what it removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text

from orchestrator_data.audit.trail import actor_of, audit_row, correlation_id_of, write_rows
from orchestrator_data.errors import ValidationError
from orchestrator_data.uow import UnitOfWork

# SET LOCAL lasts until the end of the transaction, so the switch can never
# stay on for the next user of a pooled connection.
_SWITCH_ON = text("SET LOCAL orchestrator_data.audit_prune = 'on'")
_SWITCH_OFF = text("SET LOCAL orchestrator_data.audit_prune = 'off'")
_DELETE_OLDER = text(
    "WITH gone AS (DELETE FROM audit_logs WHERE timestamp < now() - :age RETURNING timestamp) "
    "SELECT count(*), min(timestamp), max(timestamp), now() - :age FROM gone"
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
    session.execute(_SWITCH_ON)
    count, oldest, newest, cutoff = session.execute(_DELETE_OLDER, {"age": older_than}).one()
    # Append-only again for the rest of this transaction. (Had the DELETE
    # failed, the transaction would be aborted and rolled back, switch and all.)
    session.execute(_SWITCH_OFF)
    result = PruneResult(int(count), cutoff, oldest, newest)
    row = audit_row(
        action="prune",
        actor=actor_of(session),
        resource_type="audit_log",
        resource_id=None,
        old={"rows": result.deleted, "oldest": oldest, "newest": newest},
        new=None,
        correlation_id=correlation_id_of(session),
        extra={"cutoff": cutoff, "older_than_seconds": older_than.total_seconds()},
    )
    write_rows(session.connection(), [row])
    return result
