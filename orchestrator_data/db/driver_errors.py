"""Translation of driver errors into this package's exceptions, by SQLSTATE,
and the scrubbing that keeps parameter values out of every error.

psycopg2 fills the parameters into the SQL on the client, so PostgreSQL's
report quotes them: the ``LINE 1:`` excerpt of the statement, ``DETAIL: Key
(name)=(...) already exists``, ``invalid input syntax for type uuid: "..."``.
SQLAlchemy's ``hide_parameters`` only covers its own ``[parameters: ...]``
line. So at the engine boundary (the ``handle_error`` event) every driver
error is scrubbed *in place* -- the psycopg2 exception and SQLAlchemy's
wrapper both, since whatever the engine raises chains to them -- before it is
translated. What stays: the SQLSTATE and its name, the names PostgreSQL
reports (schema, table, column, constraint, data type), the primary message
with any quoted text that is not such a name (or a word of the statement as
written, placeholders and all) masked, and the statement with placeholders.

Package errors are built from those names only, never from the values.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import psycopg2
from psycopg2 import errorcodes
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
DATA_EXCEPTION_CLASS = "22"
#: SQLSTATEs of a connection that is gone or cannot be made: class 08
#: (connection exception) and the server shutting down or starting up.
UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})

#: Shown wherever part of PostgreSQL's report was dropped.
WITHHELD = "[details withheld: they may quote parameter values]"

# A double- or single-quoted stretch of a message ("" and '' escape the quote).
_QUOTED = re.compile(r'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'')
# The words of a statement, to tell an identifier it names from a value.
_WORD = re.compile(r"[^\s,()\[\]=<>;:]+")
_MASK = "…"


def is_retryable(error: BaseException) -> bool:
    """True for serialization failures and deadlocks, however deeply wrapped."""
    return sqlstate_of(error) in RETRYABLE_SQLSTATES


def is_unavailable(error: BaseException) -> bool:
    """True when ``error`` says PostgreSQL cannot be reached or the connection
    is gone: a psycopg2 ``OperationalError`` / ``InterfaceError`` without a
    SQLSTATE (libpq's own failures: refused, DNS, TLS, authentication, closed),
    a class-08 SQLSTATE, or the server shutting down."""
    orig = getattr(error, "orig", error)
    code = getattr(orig, "pgcode", None)
    if code:
        return code.startswith("08") or code in UNAVAILABLE_SQLSTATES
    return isinstance(orig, (psycopg2.OperationalError, psycopg2.InterfaceError))


def _diag(error: BaseException, name: str) -> str | None:
    orig = getattr(error, "orig", error)
    value = getattr(getattr(orig, "diag", None), name, None)
    return value if isinstance(value, str) else None


def _constraint(error: BaseException) -> str | None:
    return _diag(error, "constraint_name")


def _column(error: BaseException) -> str | None:
    return _diag(error, "column_name")


def _table(error: BaseException) -> str | None:
    return _diag(error, "table_name")


def translate(error: BaseException, *, entity: str | None = None) -> OrchestratorDataError | None:
    """The package error for a driver error, or ``None`` to let it propagate.

    Serialization failures and deadlocks are left alone: the unit of work's
    retry loop must see them. Call :func:`scrub` on the driver error too:
    the package error is raised with it as its cause.
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
        return ConflictError(message, sqlstate=code, constraint=constraint, table=_table(error))
    if code == FOREIGN_KEY_VIOLATION:
        constraint = _constraint(error)
        return ConflictError(
            f"{what} refers to a row that does not exist, or is still referenced"
            + (f" ({constraint})" if constraint else ""),
            sqlstate=code,
            constraint=constraint,
            table=_table(error),
        )
    if code == CHECK_VIOLATION:
        constraint = _constraint(error) or "check"
        field = _field_of(constraint) or constraint
        return ValidationError(
            {field: ["violates constraint " + constraint]}, entity=entity, sqlstate=code
        )
    if code == NOT_NULL_VIOLATION:
        return ValidationError(
            {_column(error) or "field": ["may not be null"]}, entity=entity, sqlstate=code
        )
    if code and code.startswith(DATA_EXCEPTION_CLASS):
        # A value the server could not take (bad syntax for its type, out of
        # range, too long): the primary message names the type, not the value
        # once masked ('invalid input syntax for type uuid: "…"').
        return ValidationError(
            {_column(error) or "value": [_primary(error, statement=None)]},
            entity=entity,
            sqlstate=code,
        )
    if code == QUERY_CANCELED:
        return DatabaseTimeoutError(
            "statement cancelled: it ran longer than statement_timeout "
            "(or was cancelled by the server)"
        )
    return None


# -- scrubbing -----------------------------------------------------------------


def scrub(
    error: BaseException, wrapper: BaseException | None = None, *, statement: str | None = None
) -> None:
    """Rewrite, in place, the text of the driver error ``error`` and of its
    SQLAlchemy ``wrapper`` (a ``StatementError``) so that neither quotes a
    parameter value; clear what else holds the values (the wrapper's
    ``params``, psycopg2's ``pgerror`` and ``cursor``). ``statement`` is the
    SQL as SQLAlchemy wrote it (placeholders, no values).

    psycopg2's ``diag`` still reads PostgreSQL's full report: it is not
    printed by ``str``, ``repr`` or a traceback, and only this module reads
    it (for names).
    """
    if isinstance(error, OrchestratorDataError) or not isinstance(error, Exception):
        return  # our messages carry no values; KeyboardInterrupt and co. are left alone
    if not isinstance(error, psycopg2.Error) and wrapper is None:
        return  # raised by an event hook, not by the driver or parameter processing
    safe = safe_message(error, statement=statement)
    error.args = (safe,)
    if isinstance(error, psycopg2.Error):
        # pgerror and cursor (whose .query is the statement with the values
        # filled in) are read-only attributes; psycopg2's unpickling hook is
        # the one way to reset them (it keeps the SQLSTATE, and diag).
        reset: Callable[[dict[str, str | None]], None] = error.__setstate__
        reset({"pgerror": safe, "pgcode": error.pgcode})
    if isinstance(wrapper, sa_exc.StatementError) and wrapper is not error:
        wrapper.args = (f"({type(error).__module__}.{type(error).__name__}) {safe}",)
        wrapper.params = None  # hidden from its text, but kept for pickling: drop them


def safe_message(error: BaseException, *, statement: str | None = None) -> str:
    """The text of ``error`` without anything that may quote a value."""
    code = getattr(error, "pgcode", None)
    if not code and isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        # libpq's and psycopg2's connection failures (refused, closed, TLS,
        # authentication): host, port, user and database, never a password
        # or a parameter.
        return str(error).strip()
    primary = _primary(error, statement=statement)
    if not code:
        return primary if primary == str(error).strip() else f"{primary} {WITHHELD}"
    facts = [f"SQLSTATE {code}" + (f" {name}" if (name := _code_name(code)) else "")]
    for label, attr in (
        ("table", "table_name"),
        ("column", "column_name"),
        ("constraint", "constraint_name"),
    ):
        if value := _diag(error, attr):
            facts.append(f"{label} {value}")
    text = f"{primary} ({', '.join(facts)})"
    return f"{text} {WITHHELD}" if _withheld(error, primary) else text


def _code_name(code: str) -> str | None:
    # psycopg2's table of SQLSTATE names (unique_violation, ...); a code newer
    # than the installed psycopg2 has none.
    try:
        return errorcodes.lookup(code).lower()
    except KeyError:
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    if text.startswith("ERROR:"):
        text = text[len("ERROR:") :].strip()
    return text.splitlines()[0] if text else type(error).__name__


def _primary(error: BaseException, *, statement: str | None) -> str:
    """PostgreSQL's primary message (else the first line of the text), with
    any quoted stretch masked unless it is a name the server reported or a
    word of ``statement``."""
    primary = _diag(error, "message_primary") or _first_line(error)
    keep = {
        name
        for attr in ("schema_name", "table_name", "column_name", "constraint_name", "datatype_name")
        if (name := _diag(error, attr))
    }
    if statement:
        keep.update(word.strip('"') for word in _WORD.findall(statement))

    def mask(match: re.Match[str]) -> str:
        quoted = match.group(0)
        inner = quoted[1:-1]
        return quoted if inner in keep else quoted[0] + _MASK + quoted[0]

    return _QUOTED.sub(mask, primary)


def _withheld(error: BaseException, primary: str) -> bool:
    """Whether anything of the server's report was left out."""
    if primary != (_diag(error, "message_primary") or primary):
        return True
    if any(
        _diag(error, attr)
        for attr in ("message_detail", "message_hint", "context", "internal_query")
    ):
        return True
    return bool(_diag(error, "statement_position") or _diag(error, "internal_position"))


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
