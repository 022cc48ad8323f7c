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

Plain SQL text (``session.execute(text(...))``) and Core statements run on
``session.connection()`` are not ORM statements and are not captured.

Changes are kept per transaction: those made inside a savepoint that rolls
back are discarded, the committed transaction's changes are handed to
``on_commit`` subscribers once, and a rollback drops them.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Delete,
    Insert,
    Update,
    any_,
    bindparam,
    event,
    inspect,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import ORMExecuteState, SessionTransaction, UOWTransaction, sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.sql import ClauseElement, ColumnElement
from sqlalchemy.sql.elements import TextClause

from orchestrator_data.errors import UncapturedWriteError
from orchestrator_data.models.base import Base

Action = Literal["create", "update", "delete"]

#: Columns never reported as changed on update: bookkeeping, not content.
IGNORED_ON_UPDATE = frozenset({"updated_at"})

_STACK = "orchestrator_data.changes.stack"
_ROLLED_BACK = "orchestrator_data.changes.rolled_back"
_WRITTEN = "orchestrator_data.changes.written"
_OLD = "orchestrator_data.changes.old"
_CASCADED = "orchestrator_data.changes.cascaded"


@dataclass(frozen=True)
class Change:
    """One row created, updated or deleted.

    ``old`` / ``new`` use the public field names (``metadata``, not
    ``metadata_``): the full row on create (``new``) and delete (``old``),
    only the fields that changed on update. Both are ``None`` when no
    subscriber asked for values.
    """

    entity: str
    model: type[Base]
    ident: uuid.UUID
    action: Action
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    bulk: bool = False
    #: Made by the database itself: a foreign key's ON DELETE CASCADE / SET NULL.
    cascade: bool = False


FlushListener = Callable[[OrmSession, Sequence[Change]], None]
CommitListener = Callable[[OrmSession, Sequence[Change]], None]
RollbackListener = Callable[[OrmSession], None]


def has_written(session: OrmSession) -> bool:
    """True once the session's current transaction has written anything
    through the ORM (a flush with changes, or a bulk statement)."""
    return bool(session.info.get(_WRITTEN))


class ChangeCapture:
    """Captures the changes to ``models`` made through sessions of the
    factories it is installed on, and hands them to subscribers."""

    def __init__(self, models: Iterable[type[Base]]) -> None:
        self._models = {m.__table__: m for m in models}
        self._flush_listeners: list[FlushListener] = []
        self._commit_listeners: list[CommitListener] = []
        self._rollback_listeners: list[RollbackListener] = []
        self._want_values = False
        self._write_pattern: re.Pattern[str] | None = None

    # -- subscription ------------------------------------------------------

    def on_flush(self, fn: FlushListener, *, values: bool = True) -> None:
        """Call ``fn(session, changes)`` inside the transaction, right after the
        changes reached the database; it may run SQL on ``session.connection()``.
        ``values=True`` makes every Change carry its old and new values."""
        self._flush_listeners.append(fn)
        self._want_values = self._want_values or values

    def on_commit(self, fn: CommitListener) -> None:
        """Call ``fn(session, changes)`` after the outermost COMMIT with every
        change the committed transaction made (rolled-back savepoints excluded)."""
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
            # Ended without commit (rollback, or close() without commit):
            # whatever was written is gone.
            self._discard(session)
            session.info.pop(_ROLLED_BACK, None)

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
            for fn in self._commit_listeners:
                fn(session, changes)

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

    # -- bulk statements -----------------------------------------------------

    def _do_orm_execute(self, state: ORMExecuteState) -> Any:
        if isinstance(state.statement, TextClause):
            self._refuse_uncaptured_write(state.statement.text)
            return None
        if not (state.is_update or state.is_delete or state.is_insert):
            return None
        mapper = state.bind_mapper
        model = self._models.get(mapper.local_table) if mapper is not None else None
        if model is None:
            return None
        statement = state.statement
        if isinstance(statement, Insert):
            return self._bulk_insert(state, model, statement)
        if isinstance(statement, (Update, Delete)):
            return self._bulk_update_delete(state, model, statement)
        return None

    def _refuse_uncaptured_write(self, sql: str) -> None:
        # Plain SQL cannot be captured (no old values, no affected rows): a
        # write to a tracked table that way would leave no audit row and no
        # invalidation. Refused, with the way to do it instead.
        if self._write_pattern is None:
            names = "|".join(re.escape(m.__tablename__) for m in self._models.values())
            self._write_pattern = re.compile(
                r"\b(?:insert\s+into|update|delete\s+from|truncate|merge\s+into)"
                r"\s+(?:table\s+)?(?:only\s+)?(?:(?:\"?\w+\"?)\.)?\"?(" + names + r")\"?(?![\w.])",
                re.IGNORECASE,
            )
        match = self._write_pattern.search(sql)
        if match:
            table = match.group(1).lower()
            model = next(m for m in self._models.values() if m.__tablename__ == table)
            raise UncapturedWriteError(
                f"plain SQL writing {table} would escape the audit trail and the caches: "
                f"use ORM statements through the session (update({model.__name__}), "
                f"delete({model.__name__}), insert({model.__name__})) or the repositories"
            )

    def _bulk_update_delete(
        self, state: ORMExecuteState, model: type[Base], statement: Update | Delete
    ) -> Any:
        session = state.session
        table = model.__table__
        pk = table.c.id
        connection = session.connection()
        params = state.parameters
        select_params: dict[str, Any] | None = None
        if isinstance(params, Sequence):
            # Bulk UPDATE by primary key: session.execute(update(Model), [{"id": ..}, ..]).
            criteria: ColumnElement[bool] = pk.in_([p["id"] for p in params if "id" in p])
        else:
            where = statement.whereclause
            criteria = where if where is not None else true()
            select_params = dict(params) if isinstance(params, Mapping) else None
        values = self._want_values
        if not values:
            columns = [pk]
        elif isinstance(statement, Update):
            # Only the columns the UPDATE sets can differ: reading just those
            # (not every JSONB column of 1,000 rows, twice) is most of the
            # saving on a bulk update.
            columns = [pk, *_set_columns(model, statement, params)]
        else:
            columns = list(table.c)
        keys = [c.key for c in columns]
        query = select(*columns).where(criteria)
        if not _snapshot_is_stable(connection):
            # READ COMMITTED: FOR UPDATE makes the rows read exactly those the
            # statement changes, with the values it overwrites. At REPEATABLE
            # READ and SERIALIZABLE the snapshot already guarantees that (a row
            # changed since would fail the UPDATE), without dirtying every row.
            query = query.with_for_update()
        before = {row[0]: row for row in connection.execute(query, select_params)}
        cascaded: list[Change] = []
        if isinstance(statement, Delete) and before:
            cascaded = self._cascades(connection, model, list(before))
        result = state.invoke_statement()
        entity = model.__entity__
        changes: list[Change] = []
        if isinstance(statement, Delete):
            for ident, row in before.items():
                old = _snapshot_row(keys, row) if values else None
                changes.append(Change(entity, model, ident, "delete", old, None, bulk=True))
        elif before and not values:
            changes = [Change(entity, model, i, "update", None, None, bulk=True) for i in before]
        elif before:
            # One array parameter, not 1,000 bound values.
            ids = bindparam("ids", list(before), type_=ARRAY(pk.type))
            after = connection.execute(select(*columns).where(pk == any_(ids)))
            for new_row in after:
                old_vals: dict[str, Any] = {}
                new_vals: dict[str, Any] = {}
                for key, a, b in zip(keys, before[new_row[0]], new_row, strict=True):
                    if key not in IGNORED_ON_UPDATE and a != b:
                        old_vals[key], new_vals[key] = _snapshot(a), _snapshot(b)
                if new_vals:
                    changes.append(
                        Change(entity, model, new_row[0], "update", old_vals, new_vals, bulk=True)
                    )
        self._record(session, changes + cascaded)
        return result

    def _cascades(
        self, connection: Connection, model: type[Base], ids: list[uuid.UUID]
    ) -> list[Change]:
        """The changes the database will make itself when rows ``ids`` of
        ``model`` are deleted: rows of tracked tables removed by ON DELETE
        CASCADE (recursively) or updated by ON DELETE SET NULL. Read before
        the DELETE, which is the last moment they can be."""
        values = self._want_values
        lock = not _snapshot_is_stable(connection)
        changes: list[Change] = []
        parent = model.__table__
        for table, dependent in self._models.items():
            for fk in table.foreign_keys:
                if fk.column.table is not parent:
                    continue
                rule = (fk.ondelete or "").upper()
                column = fk.parent
                entity = dependent.__entity__
                if rule == "CASCADE":
                    columns = list(table.c) if values else [table.c.id]
                    query = select(*columns).where(column.in_(ids))
                    rows = connection.execute(query.with_for_update() if lock else query).all()
                    keys = [c.key for c in columns]
                    for row in rows:
                        old = _snapshot_row(keys, row) if values else None
                        changes.append(
                            Change(entity, dependent, row[0], "delete", old, None, cascade=True)
                        )
                    if rows:
                        changes += self._cascades(connection, dependent, [r[0] for r in rows])
                elif rule == "SET NULL":
                    query = select(table.c.id, column).where(column.in_(ids))
                    for ident, before in connection.execute(
                        query.with_for_update() if lock else query
                    ):
                        old_vals = {column.key: before} if values else None
                        new_vals = {column.key: None} if values else None
                        changes.append(
                            Change(
                                entity, dependent, ident, "update", old_vals, new_vals, cascade=True
                            )
                        )
        return changes

    def _bulk_insert(self, state: ORMExecuteState, model: type[Base], statement: Insert) -> Any:
        # The primary key is assigned here (the ORM would apply the uuid4
        # default later) so that the inserted rows can be selected afterwards.
        params = state.parameters
        if isinstance(params, Sequence):
            rows = [p if "id" in p else {**p, "id": uuid.uuid4()} for p in params]
            ids = [r["id"] for r in rows]
            result = state.invoke_statement(params=rows)
        elif params and "id" in params:
            ids = [params["id"]]
            result = state.invoke_statement()
        elif params:
            new_id = uuid.uuid4()
            ids = [new_id]
            result = state.invoke_statement(params={"id": new_id})
        else:
            # insert(Model).values(...): the values live in the statement.
            compiled = statement.compile().params
            if compiled.get("id") is not None:
                ids = [compiled["id"]]
                result = state.invoke_statement()
            else:
                new_id = uuid.uuid4()
                ids = [new_id]
                result = state.invoke_statement(statement=statement.values(id=new_id))
        table = model.__table__
        columns = list(table.c) if self._want_values else [table.c.id]
        keys = [c.key for c in columns]
        changes: list[Change] = []
        # Rows skipped by ON CONFLICT DO NOTHING do not exist, so are not reported.
        query = select(*columns).where(table.c.id.in_(ids))
        for row in state.session.connection().execute(query):
            new = _snapshot_row(keys, row) if self._want_values else None
            changes.append(Change(model.__entity__, model, row[0], "create", None, new, bulk=True))
        self._record(state.session, changes)
        return result


def _snapshot_is_stable(connection: Connection) -> bool:
    """True at REPEATABLE READ and SERIALIZABLE: every statement of the
    transaction sees the same snapshot."""
    level = connection.get_execution_options().get("isolation_level")
    level = level or connection.default_isolation_level or ""
    return str(level).upper() in ("REPEATABLE READ", "SERIALIZABLE")


def _set_columns(model: type[Base], statement: Update, params: Any) -> list[Any]:
    """The columns ``statement`` assigns (``updated_at`` aside); every column
    when that cannot be told."""
    table = model.__table__
    everything = [c for c in table.c if c.key != "id"]
    mapper = inspect(model)
    found: list[Any] = []
    if isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
        # By primary key: the parameter sets name the attributes they set.
        for key in dict.fromkeys(k for p in params for k in p if k != "id"):
            attr = mapper.column_attrs.get(key)
            if attr is None:
                return everything
            found.append(attr.columns[0])
        return found
    # .values() / .ordered_values(): SQLAlchemy keeps them keyed by Column.
    assigned = getattr(statement, "_values", None) or dict(
        getattr(statement, "_ordered_values", None) or ()
    )
    if not assigned:
        return everything
    for key in assigned:
        if isinstance(key, str):
            attr = mapper.column_attrs.get(key)
            column = attr.columns[0] if attr is not None else table.c.get(key)
        else:
            column = table.c.get(getattr(key, "key", None) or "")
        if column is None:
            return everything
        found.append(column)
    return found


def _snapshot_row(keys: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    # Table column keys are the database column names, which are the public
    # field names (``metadata``), so no renaming is needed here.
    return {k: _snapshot(v) for k, v in zip(keys, row, strict=True)}


def _snapshot(value: Any) -> Any:
    # JSON values are mutable: the record must not change when the caller
    # mutates the object afterwards.
    return copy.deepcopy(value) if isinstance(value, (dict, list)) else value


def _row(obj: Base, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    model = type(obj)
    renamed = model.__renamed__
    out: dict[str, Any] = {}
    state = inspect(obj)
    for attr in state.mapper.column_attrs:
        key = attr.key
        value = overrides[key] if overrides and key in overrides else state.dict.get(key)
        out[renamed.get(key, key)] = _snapshot(value)
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
        old[name] = _snapshot(before)
        new[name] = _snapshot(after)
    if not new:
        return None
    return old, new
