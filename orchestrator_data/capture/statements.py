"""Capture of ORM statements run through ``session.execute``: bulk
``update(Model)``, ``delete(Model)``, ``insert(Model), [rows]``, the rows the
database cascades to, and the refusal of plain SQL writing a tracked table.

A mixin of :class:`~orchestrator_data.capture.change_capture.ChangeCapture`, which owns the
subscriptions and the per-transaction bookkeeping.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Delete, Insert, Update, any_, bindparam, inspect, select, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.elements import TextClause

from orchestrator_data.capture.change import IGNORED_ON_UPDATE, Change, snapshot, snapshot_row
from orchestrator_data.errors import UncapturedWriteError
from orchestrator_data.models.base import Base


class StatementCapture:
    """Turns ORM statements into :class:`Change` records (see the module doc)."""

    _models: dict[Any, type[Base]]
    _want_values: bool
    _write_pattern: re.Pattern[str] | None

    def _record(self, session: OrmSession, changes: list[Change]) -> None:
        raise NotImplementedError  # provided by ChangeCapture

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
            new = snapshot_row(keys, row) if self._want_values else None
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
