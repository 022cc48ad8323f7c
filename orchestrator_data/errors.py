"""The one exception hierarchy of orchestrator_data.

Driver errors are translated at the boundary (by SQLSTATE, never by wrapper
class), so callers catch these and nothing from psycopg2 or redis-py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class OrchestratorDataError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(OrchestratorDataError):
    """A setting is missing or malformed, or a required component is absent."""


class ValidationError(OrchestratorDataError):
    """Input failed validation; nothing was written.

    ``messages`` maps each bad field to the list of problems found with it;
    ``sqlstate`` is PostgreSQL's code when the server refused the value.
    """

    def __init__(
        self,
        messages: Mapping[str, Any],
        *,
        entity: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        self.messages: dict[str, Any] = dict(messages)
        self.entity = entity
        self.sqlstate = sqlstate
        self.fields: list[str] = sorted(self.messages)
        where = f"{entity}: " if entity else ""
        detail = "; ".join(
            f"{field}: {_flatten(msg)}" for field, msg in sorted(self.messages.items())
        )
        super().__init__(f"invalid {where}{detail}")


def _flatten(msg: Any) -> str:
    if isinstance(msg, str):
        return msg
    if isinstance(msg, Mapping):
        return ", ".join(f"{k}: {_flatten(v)}" for k, v in msg.items())
    if isinstance(msg, Sequence):
        return " ".join(_flatten(m) for m in msg)
    return str(msg)


class NotFoundError(OrchestratorDataError):
    """The requested row does not exist."""

    def __init__(self, entity: str, ident: object) -> None:
        self.entity = entity
        self.ident = ident
        super().__init__(f"{entity} {ident} not found")


class ConflictError(OrchestratorDataError):
    """A write conflicts with existing data (unique or foreign-key violation).

    ``sqlstate``, ``constraint`` and ``table`` name what conflicted; the
    message never quotes the values.
    """

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        constraint: str | None = None,
        table: str | None = None,
    ) -> None:
        self.sqlstate = sqlstate
        self.constraint = constraint
        self.table = table
        super().__init__(message)


class RetryExhaustedError(OrchestratorDataError):
    """A transaction kept failing with serialization failures or deadlocks."""

    def __init__(self, attempts: int, last_error: BaseException) -> None:
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(
            f"transaction failed after {attempts} attempts; last error: "
            f"{type(last_error).__name__} (SQLSTATE {sqlstate_of(last_error) or 'unknown'})"
        )


class ReadSkewError(OrchestratorDataError):
    """A read-only unit of work would have returned results from two committed
    states (a cached read, then a commit, then the database snapshot).
    Retryable like a serialization failure: ``run_in_transaction`` re-runs it."""

    #: Read by ``sqlstate_of``: retried as a serialization failure.
    sqlstate = "40001"


class UncapturedWriteError(OrchestratorDataError):
    """Plain SQL tried to write a tracked table through the session, where it
    would escape the audit trail and the cache invalidation."""


class DatabaseUnavailableError(OrchestratorDataError):
    """PostgreSQL could not be reached (refused, DNS, TLS, authentication), or
    the connection was lost (server killed, restarted, network cut). The pool
    reconnects by itself once the server is back."""


class DatabaseTimeoutError(OrchestratorDataError):
    """A statement exceeded ``statement_timeout`` or the pool had no free connection in time."""


class MigrationError(OrchestratorDataError):
    """A schema migration could not run: an unknown revision, nothing to
    downgrade, or another refusal of alembic's."""


class SessionStoreUnavailableError(OrchestratorDataError):
    """A session write could not reach the coordination Redis (the live copy)."""


class SessionConflictError(ConflictError):
    """``update(..., expected_version=n)`` found another version: ``current``."""

    def __init__(self, expected: int, current: int) -> None:
        self.expected = expected
        self.current = current
        super().__init__(f"session changed: version {current}, expected {expected}")


class LockNotAcquiredError(OrchestratorDataError):
    """A distributed lock could not be acquired within its blocking timeout."""


class LockLostError(OrchestratorDataError):
    """A distributed lock expired or was taken by another owner while held."""


class RateLimitedError(OrchestratorDataError):
    """A rate limit was exceeded; ``retry_after`` says how many seconds to wait."""

    def __init__(self, key: str, retry_after: float) -> None:
        self.key = key
        self.retry_after = retry_after
        super().__init__(f"rate limit exceeded for {key}; retry after {retry_after:.2f}s")


class EmbeddedServerError(OrchestratorDataError):
    """The embedded PostgreSQL or Redis could not be started."""


def sqlstate_of(error: BaseException | None) -> str | None:
    """Return the PostgreSQL SQLSTATE of ``error`` or of any error it wraps."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "pgcode", None) or getattr(error, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
        orig = getattr(error, "orig", None)
        if isinstance(orig, BaseException):
            error = orig
            continue
        error = error.__cause__ or error.__context__
    return None
