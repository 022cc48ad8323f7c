"""Session metadata rows (the live session data is in the Redis session store)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, delete

from orchestrator_data.models import Session
from orchestrator_data.repositories import _checks
from orchestrator_data.repositories.base import Repository, _schema
from orchestrator_data.schemas import SessionSchema, rules
from orchestrator_data.schemas.base import field_value


class SessionRepository(Repository[Session]):
    """Filters: ``user_id``, ``expired`` (bool), ``created_after``, ``created_before``."""

    model_type = Session
    schema_type = SessionSchema
    sortable = frozenset({"created_at", "expires_at", "updated_at"})

    def get_by_key(self, session_key: str, *, cached: bool | None = None) -> Session | None:
        """The session with ``session_key``, or ``None``."""
        key = self._check("session_key", session_key)
        _checks.optional_boolean("cached", cached)

        def load() -> tuple[list[Session], None]:
            found = self.session.scalars(self._select({}).where(Session.session_key == key)).first()
            return ([found] if found is not None else []), None

        rows, _ = self._rows(("by_key", key), load, cached)
        return rows[0] if rows else None

    def delete_expired(self, now: datetime | None = None) -> int:
        """Delete sessions whose ``expires_at`` has passed; return how many."""
        moment = datetime.now(timezone.utc) if now is None else _checks.aware_datetime("now", now)
        result = self.session.execute(
            delete(Session)
            .where(Session.expires_at < moment)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def _filter(self, name: str, value: Any) -> ColumnElement[bool] | None:
        if name == "user_id":
            return self._equals(Session.user_id, name, value)
        if name == "expired":
            now = datetime.now(timezone.utc)
            return (
                Session.expires_at < now
                if _checks.boolean(name, value)
                else (Session.expires_at.is_(None) | (Session.expires_at >= now))
            )
        return super()._filter(name, value)


#: Size limit of a session's data, in characters of its compact JSON text.
MAX_DATA_SIZE = rules.MAX_JSON_SIZE


def check_field(field: str, value: Any, *, name: str | None = None) -> Any:
    """``value`` checked by the rules the session schema's ``field`` applies
    on create and update (``ip_address``, ``user_id``, ``data``, ...), for
    callers that validate before anything is sent (the session store); a
    :class:`~orchestrator_data.ValidationError` naming ``name`` (default
    ``field``) otherwise."""
    return field_value(_schema(SessionSchema), field, value, name=name or field, entity="session")
