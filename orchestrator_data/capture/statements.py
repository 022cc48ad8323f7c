"""Capture of ORM statements run through ``session.execute``: bulk
``update(Model)``, ``delete(Model)``, ``insert(Model), [rows]``, the rows the
database cascades to, and the refusal of plain SQL writing a tracked table.

A mixin of :class:`~orchestrator_data.capture.change_capture.ChangeCapture`, which owns the
subscriptions and the per-transaction bookkeeping.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    Connection,
    Delete,
    Insert,
    Table,
    Update,
    any_,
    bindparam,
    create_engine,
    inspect,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.dml import OnConflictDoUpdate
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.sql import ClauseElement, ColumnElement
from sqlalchemy.sql.elements import TextClause

from orchestrator_data.capture.change import IGNORED_ON_UPDATE, Change, snapshot, snapshot_row
from orchestrator_data.capture.sql_guard import Undetermined, written_relations
from orchestrator_data.errors import UncapturedWriteError
from orchestrator_data.models.base import Base

#: The table only the audit trail writes.
AUDIT_TABLE = "audit_logs"
# Text statements are compiled with $n placeholders, which PostgreSQL's
# parser reads (":name" and "%(name)s" it does not).
# (An engine that never connects: only its dialect is used.)
_DOLLAR_PARAMS = create_engine("postgresql+psycopg2://", paramstyle="numeric_dollar").dialect


class StatementCapture:
    """Turns ORM statements into :class:`Change` records (see the module doc)."""

    _models: dict[Any, type[Base]]
    _by_name: dict[str, type[Base]]
    _want_values: bool

    def _record(self, session: OrmSession, changes: list[Change]) -> None:
        raise NotImplementedError  # provided by ChangeCapture

    def _do_orm_execute(self, state: ORMExecuteState) -> Any:
        statement = state.statement
        if isinstance(statement, TextClause):
            self._refuse_uncaptured_write(statement)
            return None
        if not (state.is_update or state.is_delete or state.is_insert):
            return None
        # ORM statements (update(Agent)) and Core ones on the table
        # (update(Agent.__table__)) alike: the target table decides.
        name = getattr(getattr(statement, "table", None), "name", None)
        if name == AUDIT_TABLE:
            raise UncapturedWriteError(
                "audit rows are written by the audit trail only, not through the session"
            )
        model = self._by_name.get(name) if isinstance(name, str) else None
        if model is None:
            return None
        if isinstance(statement, Insert):
            return self._bulk_insert(state, model, statement)
        if isinstance(statement, (Update, Delete)):
            return self._bulk_update_delete(state, model, statement)
        return None

    def _refuse_uncaptured_write(self, statement: TextClause) -> None:
        # Plain SQL cannot be captured (no old values, no affected rows): a
        # write to a tracked table that way would leave no audit row and no
        # invalidation. Refused, with the way to do it instead. PostgreSQL's
        # parser decides what the text writes (see sql_guard).
        sql = str(statement.compile(dialect=_DOLLAR_PARAMS))
        try:
            written = written_relations(sql)
        except Undetermined as why:
            raise UncapturedWriteError(
                f"plain SQL through the session is refused when what it writes cannot be "
                f"determined: {why}; use ORM statements or the repositories"
            ) from None
        if AUDIT_TABLE in written:
            raise UncapturedWriteError(
                "audit rows are written by the audit trail only: plain SQL may not write "
                f"{AUDIT_TABLE} (retention prunes it: orchestrator-data audit prune)"
            )
        for model in self._models.values():
            table = model.__tablename__
            if table in written:
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
                old = snapshot_row(keys, row) if values else None
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
                        old_vals[key], new_vals[key] = snapshot(a), snapshot(b)
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
                        old = snapshot_row(keys, row) if values else None
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
        table = cast(Table, model.__table__)
        if statement.select is not None:
            raise UncapturedWriteError(
                f"INSERT INTO {table.name} ... SELECT through the session cannot be captured "
                "(the rows are not known before it runs): insert the rows themselves"
            )
        params = state.parameters
        multi = statement._multi_values
        rows: list[Mapping[Any, Any]]
        if isinstance(params, Sequence):
            rows = [p if p.get("id") is not None else {**p, "id": uuid.uuid4()} for p in params]
            invoke = partial(state.invoke_statement, params=rows)
        elif multi:
            # insert(Model).values([row, row]): the rows live in the statement.
            rows = [_with_id(table, row) for row in multi[0] if isinstance(row, Mapping)]
            if len(rows) != len(multi[0]):
                raise UncapturedWriteError(
                    f"multi-row VALUES into {table.name} given as tuples cannot be captured: "
                    "give each row as a mapping of column to value"
                )
            clone = statement._clone()
            clone._multi_values = (rows,)  # type: ignore[assignment]  # rows of the same shape
            invoke = partial(state.invoke_statement, statement=clone)
        elif params and params.get("id") is not None:
            rows = [dict(params)]
            invoke = partial(state.invoke_statement)
        elif params:
            rows = [{**params, "id": uuid.uuid4()}]
            invoke = partial(state.invoke_statement, params={"id": rows[0]["id"]})
        else:
            # insert(Model).values(...): the values live in the statement.
            compiled = statement.compile().params
            if compiled.get("id") is not None:
                rows = [compiled]
                invoke = partial(state.invoke_statement)
            else:
                rows = [{**compiled, "id": uuid.uuid4()}]
                invoke = partial(
                    state.invoke_statement, statement=statement.values(id=rows[0]["id"])
                )
        ids = [_value(table, row, "id") for row in rows]
        upsert = statement._post_values_clause
        if isinstance(upsert, OnConflictDoUpdate):
            return self._upsert(state, model, upsert, rows, ids, invoke)
        result = invoke()
        columns = list(table.c) if self._want_values else [table.c.id]
        keys = [c.key for c in columns]
        changes: list[Change] = []
        # Rows skipped by ON CONFLICT DO NOTHING do not exist, so are not reported.
        query = select(*columns).where(table.c.id.in_(ids))
        for row in state.session.connection().execute(query):
            new = snapshot_row(keys, row) if self._want_values else None
            changes.append(Change(model.__entity__, model, row[0], "create", None, new, bulk=True))
        self._record(state.session, changes)
        return result

    def _upsert(
        self,
        state: ORMExecuteState,
        model: type[Base],
        upsert: OnConflictDoUpdate,
        rows: list[Any],
        ids: list[Any],
        invoke: Callable[[], Any],
    ) -> Any:
        """INSERT ... ON CONFLICT DO UPDATE: the rows it inserts are creates,
        the existing rows it updates are updates, with their old values (read,
        locked at READ COMMITTED, before the statement runs)."""
        table = cast(Table, model.__table__)
        target = _conflict_columns(table, upsert)
        keys_of_rows: list[tuple[Any, ...]] = []
        for row in rows:
            key = tuple(_value(table, row, column.key) for column in target)
            if any(isinstance(v, ClauseElement) for v in key):
                raise UncapturedWriteError(
                    f"an upsert into {table.name} whose conflict columns are SQL expressions "
                    "cannot be captured: pass their values"
                )
            keys_of_rows.append(key)
        connection = state.session.connection()
        columns = list(table.c)
        keys = [c.key for c in columns]
        matches = tuple_(*target).in_(keys_of_rows)
        query = select(*columns).where(matches)
        if not _snapshot_is_stable(connection):
            query = query.with_for_update()
        before = {row[0]: row for row in connection.execute(query)}
        result = invoke()
        after = connection.execute(
            select(*columns).where(or_(table.c.id.in_(ids), matches, table.c.id.in_(list(before))))
        )
        entity = model.__entity__
        changes: list[Change] = []
        for row in after:
            old_row = before.get(row[0])
            if old_row is None and row[0] in ids:
                new = snapshot_row(keys, row) if self._want_values else None
                changes.append(Change(entity, model, row[0], "create", None, new, bulk=True))
                continue
            old_vals: dict[str, Any] = {}
            new_vals: dict[str, Any] = {}
            previous = tuple(old_row) if old_row is not None else (None,) * len(keys)
            for name, a, b in zip(keys, previous, row, strict=True):
                if name not in IGNORED_ON_UPDATE and (old_row is None or a != b):
                    old_vals[name], new_vals[name] = snapshot(a), snapshot(b)
            if new_vals:
                # old_row is None: a row inserted by another transaction after
                # the read above and updated by this statement; its old values
                # are unknown.
                old = (old_vals if old_row is not None else None) if self._want_values else None
                new = new_vals if self._want_values else None
                changes.append(Change(entity, model, row[0], "update", old, new, bulk=True))
        self._record(state.session, changes)
        return result


def _with_id(table: Any, row: Mapping[Any, Any]) -> dict[Any, Any]:
    """``row`` of a multi-row VALUES (keyed by Column or name), with an id."""
    if any(_key_name(k) == "id" and v is not None for k, v in row.items()):
        return dict(row)
    return {**row, table.c.id: uuid.uuid4()}


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else str(getattr(key, "key", key))


def _value(table: Any, row: Mapping[Any, Any], name: str) -> Any:
    """The value ``row`` gives column ``name`` (rows are keyed by column
    name, attribute name or Column; bound parameters give their value)."""
    for key, value in row.items():
        if _key_name(key) == name or _attribute_column(table, key) == name:
            return getattr(value, "value", value) if isinstance(value, BindParameter) else value
    return None


def _attribute_column(table: Any, key: Any) -> str | None:
    if not isinstance(key, str):
        return None
    for column in table.c:
        if column.key == key or column.name == key.rstrip("_"):
            return str(column.name)
    return None


def _conflict_columns(table: Any, upsert: OnConflictDoUpdate) -> list[Any]:
    """The columns of the upsert's conflict target (index_elements, or the
    named constraint or unique index)."""
    if upsert.constraint_target is not None:
        name = upsert.constraint_target
        for holder in [*table.constraints, *table.indexes]:
            if holder.name == name:
                return list(holder.columns)
        raise UncapturedWriteError(f"an upsert names {name}, which {table.name} does not have")
    columns = []
    for element in upsert.inferred_target_elements or ():
        column = table.c.get(_key_name(element))
        if column is None:
            raise UncapturedWriteError(
                f"an upsert into {table.name} whose conflict target is an expression "
                "cannot be captured: name the columns"
            )
        columns.append(column)
    return columns


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
