"""Translation of driver errors into this package's exceptions, by SQLSTATE.

Messages are built from constraint names, never from the driver's DETAIL
text, which echoes the offending values (and those may be secrets).
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from orchestrator_data.errors import (
    ConflictError,
    DatabaseTimeoutError,
    OrchestratorDataError,
    ValidationError,
    sqlstate_of,
)

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, DEADLOCK_DETECTED})
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
CHECK_VIOLATION = "23514"
NOT_NULL_VIOLATION = "23502"
QUERY_CANCELED = "57014"


def is_retryable(error: BaseException) -> bool:
    """True for serialization failures and deadlocks, however deeply wrapped."""
    return sqlstate_of(error) in RETRYABLE_SQLSTATES


def _constraint(error: BaseException) -> str | None:
    orig = getattr(error, "orig", error)
    diag = getattr(orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    return name if isinstance(name, str) else None


def _column(error: BaseException) -> str | None:
    orig = getattr(error, "orig", error)
    diag = getattr(orig, "diag", None)
    name = getattr(diag, "column_name", None)
    return name if isinstance(name, str) else None


def translate(error: BaseException, *, entity: str | None = None) -> OrchestratorDataError | None:
    """The package error for a driver error, or ``None`` to let it propagate.

    Serialization failures and deadlocks are left alone: the unit of work's
    retry loop must see them.
    """
    if isinstance(error, sa_exc.TimeoutError):
        return DatabaseTimeoutError(
            "no database connection became free within the pool timeout; "
            "raise pool_max or pool_timeout, or hold units of work for less time"
        )
    code = sqlstate_of(error)
    what = entity or _entity_of(_constraint(error)) or "row"
    if code == UNIQUE_VIOLATION:
        constraint = _constraint(error)
        field = _field_of(constraint)
        message = f"{what} with this {field} already exists" if field else f"duplicate {what}"
        return ConflictError(message, sqlstate=code, constraint=constraint)
    if code == FOREIGN_KEY_VIOLATION:
        constraint = _constraint(error)
        return ConflictError(
            f"{what} refers to a row that does not exist, or is still referenced"
            + (f" ({constraint})" if constraint else ""),
            sqlstate=code,
            constraint=constraint,
        )
    if code == CHECK_VIOLATION:
        constraint = _constraint(error) or "check"
        field = _field_of(constraint) or constraint
        return ValidationError({field: ["violates constraint " + constraint]}, entity=entity)
    if code == NOT_NULL_VIOLATION:
        return ValidationError({_column(error) or "field": ["may not be null"]}, entity=entity)
    if code == QUERY_CANCELED:
        return DatabaseTimeoutError(
            "statement cancelled: it ran longer than statement_timeout "
            "(or was cancelled by the server)"
        )
    return None


_TABLE_ENTITIES = {
    "audit_logs_": "audit_log",
    "achievements_": "achievement",
    "agents_": "agent",
    "sessions_": "session",
    "tasks_": "task",
}


def _entity_of(constraint: str | None) -> str | None:
    if constraint and constraint[:3] in ("uq_", "ck_", "fk_", "pk_"):
        rest = constraint[3:]
        for table, entity in _TABLE_ENTITIES.items():
            if rest.startswith(table):
                return entity
    return None


def _field_of(constraint: str | None) -> str | None:
    # uq_<table>_<column> / ck_<table>_<name> per the naming convention in models/base.py.
    if constraint and constraint[:3] in ("uq_", "ck_"):
        rest = constraint[3:]
        for table in _TABLE_ENTITIES:
            if rest.startswith(table):
                return rest[len(table) :]
    return None
