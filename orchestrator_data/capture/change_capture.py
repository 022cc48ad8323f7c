"""Change capture: every write made through a session, as :class:`Change` records.

One mechanism serves the audit trail (which writes its rows inside the
transaction, right after the change reaches the database) and the cache
(which invalidates after commit). It sees:

- ORM flushes (``session.add`` / attribute changes / ``session.delete``),
  including in-place mutation of JSONB columns, whose old value is read from
  the database before the flush;
- ORM-enabled bulk statements run through ``session.execute``:
  ``update(Model)...``, ``delete(Model)...`` and ``insert(Model), [rows]``.
  Affected rows are pre-selected ``FOR UPDATE`` (old values), and for
  updates and inserts selected again afterwards (new values).

Plain SQL text (``session.execute(text(...))``) that writes a tracked table
cannot be captured and is refused (``UncapturedWriteError``); Core statements
run directly on ``session.connection()`` bypass the session entirely. The
statement side lives in ``statements.py``.

Changes are kept per transaction: those made inside a savepoint that rolls
back are discarded, the committed transaction's changes are handed to
``on_commit`` subscribers once, and a rollback drops them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import event, inspect, select
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import SessionTransaction, UOWTransaction, sessionmaker
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.sql import ClauseElement

from orchestrator_data.capture.change import IGNORED_ON_UPDATE, Action, Change, snapshot
from orchestrator_data.capture.statements import StatementCapture
from orchestrator_data.errors import UncapturedWriteError
from orchestrator_data.models.audit_log import AuditLog
from orchestrator_data.models.base import Base

__all__ = ["IGNORED_ON_UPDATE", "Action", "Change", "ChangeCapture", "has_written"]

_STACK = "orchestrator_data.capture.stack"
_ROLLED_BACK = "orchestrator_data.capture.rolled_back"
_WRITTEN = "orchestrator_data.capture.written"
_OLD = "orchestrator_data.capture.old"
_CASCADED = "orchestrator_data.capture.cascaded"
_COMMITTED = "orchestrator_data.capture.committed"


FlushListener = Callable[[OrmSession, Sequence[Change]], None]
CommitListener = Callable[[OrmSession, Sequence[Change]], None]
RollbackListener = Callable[[OrmSession], None]


def has_written(session: OrmSession) -> bool:
    """True once the session's current transaction has written anything
    through the ORM (a flush with changes, or a bulk statement)."""
    return bool(session.info.get(_WRITTEN))


class ChangeCapture(StatementCapture):
    """Captures the changes to ``models`` made through sessions of the
    factories it is installed on, and hands them to subscribers."""

    def __init__(self, models: Iterable[type[Base]]) -> None:
        self._models = {m.__table__: m for m in models}
        self._by_name = {m.__tablename__: m for m in self._models.values()}
        self._flush_listeners: list[FlushListener] = []
        self._commit_listeners: list[CommitListener] = []
        self._rollback_listeners: list[RollbackListener] = []
        self._want_values = False

    # -- subscription ------------------------------------------------------

    def on_flush(self, fn: FlushListener, *, values: bool = True) -> None:
        """Call ``fn(session, changes)`` inside the transaction, right after the
        changes reached the database; it may run SQL on ``session.connection()``.
        ``values=True`` makes every Change carry its old and new values."""
        self._flush_listeners.append(fn)
        self._want_values = self._want_values or values

    def on_commit(self, fn: CommitListener) -> None:
        """Call ``fn(session, changes)`` after the outermost COMMIT with every
        change the committed transaction made (rolled-back savepoints excluded).

        It runs once the transaction has ended and its connection is back in
        the pool, so slow post-commit work (Redis) never holds a database
        connection; ``fn`` must not run SQL on ``session``."""
        self._commit_listeners.append(fn)

    def on_rollback(self, fn: RollbackListener) -> None:
        """Call ``fn(session)`` when a transaction that had written ends without
        committing (rollback, or the unit of work closed without commit)."""
        self._rollback_listeners.append(fn)

    def install(self, factory: sessionmaker[OrmSession]) -> None:
        """Attach the capture to ``factory``'s sessions (never to the global Session)."""
        event.listen(factory, "after_transaction_create", self._after_transaction_create)
        event.listen(factory, "after_rollback", self._after_rollback)
        event.listen(factory, "after_transaction_end", self._after_transaction_end)
        event.listen(factory, "before_flush", self._before_flush)
        event.listen(factory, "after_flush", self._after_flush)
        event.listen(factory, "after_commit", self._after_commit)
        event.listen(factory, "do_orm_execute", self._do_orm_execute)

    # -- transaction bookkeeping ---------------------------------------------

    def _after_transaction_create(
        self, session: OrmSession, transaction: SessionTransaction
    ) -> None:
        if transaction.parent is None:
            session.info[_STACK] = [[]]
            session.info[_WRITTEN] = False
        elif transaction.nested:
            session.info.setdefault(_STACK, [[]]).append([])

    def _after_rollback(self, session: OrmSession) -> None:
        # Dispatched while the transaction rolling back is still current, and
        # before it ends: a savepoint's changes are marked here, dropped at its end.
        nested = session.get_nested_transaction()
        if nested is not None:
            session.info.setdefault(_ROLLED_BACK, set()).add(id(nested))

    def _after_transaction_end(self, session: OrmSession, transaction: SessionTransaction) -> None:
        if transaction.nested:
            stack: list[list[Change]] = session.info.get(_STACK) or [[]]
            inner = stack.pop() if len(stack) > 1 else []
            rolled_back: set[int] = session.info.get(_ROLLED_BACK, set())
            if id(transaction) in rolled_back:
                rolled_back.discard(id(transaction))
            elif stack:
                stack[-1].extend(inner)
        elif transaction.parent is None:
            session.info.pop(_ROLLED_BACK, None)
            committed: list[Change] | None = session.info.pop(_COMMITTED, None)
            if committed is None:
                # Ended without commit (rollback, or close() without commit):
                # whatever was written is gone.
                self._discard(session)
                return
            # Committed, and the connection is back in the pool: the
            # subscribers' Redis work can no longer hold a database slot.
            for fn in self._commit_listeners:
                fn(session, committed)

    def _discard(self, session: OrmSession) -> None:
        written = session.info.get(_WRITTEN)
        session.info[_STACK] = [[]]
        session.info[_WRITTEN] = False
        if written:
            for fn in self._rollback_listeners:
                fn(session)

    def _after_commit(self, session: OrmSession) -> None:
        if session.get_nested_transaction() is not None:
            return  # a savepoint released: its changes join the parent at its end
        stack: list[list[Change]] = session.info.get(_STACK) or []
        changes = [c for level in stack for c in level]
        session.info[_STACK] = [[]]
        session.info[_WRITTEN] = False
        if changes:
            # Handed to the subscribers when the transaction ends, after
            # SQLAlchemy has returned its connection to the pool.
            session.info[_COMMITTED] = changes

    def _record(self, session: OrmSession, changes: list[Change]) -> None:
        session.info[_WRITTEN] = True
        if not changes:
            return
        stack = session.info.setdefault(_STACK, [[]])
        stack[-1].extend(changes)
        for fn in self._flush_listeners:
            fn(session, changes)

    # -- ORM flushes ---------------------------------------------------------

    def _tracked(self, obj: object) -> type[Base] | None:
        table = getattr(type(obj), "__table__", None)
        return self._models.get(table) if table is not None else None

    def _before_flush(
        self, session: OrmSession, flush_context: UOWTransaction, instances: Any
    ) -> None:
        session.info.pop(_CASCADED, None)  # left over by a flush that failed
        for obj in (*session.new, *session.dirty, *session.deleted):
            if isinstance(obj, AuditLog):
                raise UncapturedWriteError(
                    "audit rows are written by the audit trail only, not through the session"
                )
        deleting: dict[type[Base], list[uuid.UUID]] = {}
        for obj in session.deleted:
            model = self._tracked(obj)
            if model is not None:
                deleting.setdefault(model, []).append(inspect(obj).identity[0])
        if deleting:
            # What the database will cascade must be read before the DELETE.
            explicit = {i for ids in deleting.values() for i in ids}
            cascaded = [
                c
                for model, ids in deleting.items()
                for c in self._cascades(session.connection(), model, ids)
                if c.ident not in explicit
            ]
            session.info[_CASCADED] = cascaded
        # Old values unknown to the session (in-place JSONB mutation, columns
        # never loaded) must be read before the UPDATE/DELETE overwrites them.
        if not self._want_values:
            return
        missing: dict[type[Base], dict[uuid.UUID, set[str]]] = {}
        for obj in session.dirty:
            model = self._tracked(obj)
            if model is None:
                continue
            state = inspect(obj)
            columns = state.mapper.column_attrs
            for key, previous in state.committed_state.items():
                if previous is NO_VALUE and key in columns:
                    missing.setdefault(model, {}).setdefault(state.identity[0], set()).add(key)
        for obj in session.deleted:
            model = self._tracked(obj)
            if model is None:
                continue
            state = inspect(obj)
            unloaded = state.unloaded
            if unloaded:
                missing.setdefault(model, {}).setdefault(state.identity[0], set()).update(unloaded)
        if not missing:
            return
        old: dict[tuple[type[Base], uuid.UUID], dict[str, Any]] = session.info.setdefault(_OLD, {})
        connection = session.connection()
        for model, by_id in missing.items():
            keys = sorted({k for ks in by_id.values() for k in ks})
            mapper = inspect(model)
            columns = [mapper.column_attrs[k].columns[0] for k in keys]
            pk = mapper.primary_key[0]
            rows = connection.execute(select(pk, *columns).where(pk.in_(list(by_id))))
            for row in rows:
                old[(model, row[0])] = dict(zip(keys, row[1:], strict=True))

    def _after_flush(self, session: OrmSession, flush_context: UOWTransaction) -> None:
        values = self._want_values
        prefetched: dict[tuple[type[Base], uuid.UUID], dict[str, Any]] = session.info.pop(_OLD, {})
        changes: list[Change] = []
        for obj in session.new:
            model = self._tracked(obj)
            if model is not None:
                new = _row(obj) if values else None
                changes.append(Change(model.__entity__, model, obj.id, "create", None, new))
        for obj in session.dirty:
            model = self._tracked(obj)
            if model is None or not session.is_modified(obj):
                continue
            ident: uuid.UUID = obj.id
            if not values:
                changes.append(Change(model.__entity__, model, ident, "update", None, None))
                continue
            diff = _diff(obj, prefetched.get((model, ident), {}))
            if diff is not None:
                changes.append(Change(model.__entity__, model, ident, "update", diff[0], diff[1]))
        for obj in session.deleted:
            model = self._tracked(obj)
            if model is not None:
                ident = obj.id
                old = None
                if values:
                    old = _row(obj, prefetched.get((model, ident), {}))
                changes.append(Change(model.__entity__, model, ident, "delete", old, None))
        changes.extend(session.info.pop(_CASCADED, ()))
        self._record(session, changes)


def _row(obj: Base, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    model = type(obj)
    renamed = model.__renamed__
    out: dict[str, Any] = {}
    state = inspect(obj)
    for attr in state.mapper.column_attrs:
        key = attr.key
        value = overrides[key] if overrides and key in overrides else state.dict.get(key)
        out[renamed.get(key, key)] = snapshot(value)
    return out


def _diff(obj: Base, prefetched: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(old, new) of the changed, non-bookkeeping fields; None if nothing changed."""
    state = inspect(obj)
    renamed = type(obj).__renamed__
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    columns = state.mapper.column_attrs
    # Only attributes with a committed_state entry can have changed: no need
    # to ask every column for its history.
    for key in list(state.committed_state):
        if key in IGNORED_ON_UPDATE or key not in columns:
            continue
        history = state.attrs[key].history
        if not history.has_changes():
            continue
        if key in prefetched:
            before = prefetched[key]
        elif history.deleted:
            before = history.deleted[0]
        else:
            before = None
        after = history.added[0] if history.added else state.dict.get(key)
        if isinstance(after, ClauseElement):
            # Set to a SQL expression (e.g. ``retry_count + 1``): read the result.
            after = getattr(obj, key)
        if before == after:
            continue
        name = renamed.get(key, key)
        old[name] = snapshot(before)
        new[name] = snapshot(after)
    if not new:
        return None
    return old, new
