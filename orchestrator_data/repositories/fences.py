"""Fencing tokens recorded in PostgreSQL: what ``uow.fence(lock)`` runs."""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.errors import LockLostError, ValidationError
from orchestrator_data.models import LockFence
from orchestrator_data.models.lock_fence import LOCK_NAME_LENGTH
from orchestrator_data.schemas import rules

#: Tokens are PostgreSQL bigints.
MAX_TOKEN = 2**63 - 1


def record_fence(session: OrmSession, name: str, token: int) -> int:
    """Record ``token`` for lock ``name`` in ``session``'s transaction, and
    return it; :class:`LockLostError` when a higher token was recorded
    already (the lock has had a later holder). The upsert locks the row
    until the transaction ends, so fenced writers of one name take turns."""
    rules.checked("name", rules.text, name, min_length=1, max_length=LOCK_NAME_LENGTH)
    if isinstance(token, bool) or not isinstance(token, int) or not 0 < token <= MAX_TOKEN:
        raise ValidationError({"token": [f"Must be an integer between 1 and {MAX_TOKEN}."]})
    values = insert(LockFence).values(name=name, token=token)
    upsert = values.on_conflict_do_update(
        index_elements=[LockFence.name],
        set_={
            "token": func.greatest(LockFence.token, values.excluded.token),
            "updated_at": func.now(),
        },
    ).returning(LockFence.token)
    recorded = int(session.execute(upsert).scalar_one())
    if recorded > token:
        raise LockLostError(
            f"lock {name!r} has been held since with a later fencing token: "
            "this holder's writes are refused"
        )
    return recorded
