"""The Session class of every unit of work: legacy bulk methods made visible.

``Session.bulk_insert_mappings``, ``bulk_update_mappings`` and
``bulk_save_objects`` write without a flush and without an ORM statement,
so no session event sees them: the change capture (and so the audit trail
and the caches) would miss those rows. Here they run as the equivalent
ORM bulk statements, which are captured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import insert, inspect, update
from sqlalchemy.orm import Mapper
from sqlalchemy.orm import Session as OrmSession


class CapturedSession(OrmSession):
    """A Session whose legacy bulk methods go through captured ORM statements.

    ``return_defaults`` and ``render_nulls`` are accepted and ignored: the
    ORM statements fetch what the capture needs themselves.
    """

    def bulk_insert_mappings(
        self,
        mapper: Mapper[Any] | type[Any],
        mappings: Iterable[Mapping[str, Any]],
        return_defaults: bool = False,
        render_nulls: bool = False,
    ) -> None:
        rows = [dict(m) for m in mappings]
        if rows:
            self.execute(insert(_entity(mapper)), rows)

    def bulk_update_mappings(
        self, mapper: Mapper[Any] | type[Any], mappings: Iterable[Mapping[str, Any]]
    ) -> None:
        rows = [dict(m) for m in mappings]
        if rows:
            self.execute(update(_entity(mapper)), rows)

    def bulk_save_objects(
        self,
        objects: Iterable[object],
        return_defaults: bool = False,
        update_changed_only: bool = True,
        preserve_order: bool = True,
    ) -> None:
        # New objects become INSERT rows, persistent or detached ones UPDATE
        # rows by primary key (their changed attributes, or all of them).
        inserts: dict[type[Any], list[dict[str, Any]]] = {}
        updates: dict[type[Any], list[dict[str, Any]]] = {}
        for obj in objects:
            state = inspect(obj)
            model = type(obj)
            if state.key is None:
                row = {
                    a.key: state.dict[a.key]
                    for a in state.mapper.column_attrs
                    if a.key in state.dict
                }
                inserts.setdefault(model, []).append(row)
                continue
            row = {
                a.key: state.dict[a.key]
                for a in state.mapper.column_attrs
                if a.key in state.dict
                and (not update_changed_only or state.attrs[a.key].history.has_changes())
            }
            row.update(zip((c.key for c in state.mapper.primary_key), state.key[1], strict=True))
            updates.setdefault(model, []).append(row)
        for model, rows in inserts.items():
            self.bulk_insert_mappings(model, rows)
        for model, rows in updates.items():
            self.bulk_update_mappings(model, rows)


def _entity(mapper: Mapper[Any] | type[Any]) -> type[Any]:
    return mapper.class_ if isinstance(mapper, Mapper) else mapper
