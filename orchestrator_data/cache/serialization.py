"""JSON-safe encoding of rows, and cheap hydration of model instances from them.

Three forms of one row:

- the *model instance* the ORM loaded;
- the *L1 form*: a tuple of column values in mapper order (UUID, datetime,
  str, int, bool, None, and JSON values). The JSON values in it are private
  to the cache: they are copied in when the tuple is made and copied out at
  every hydration, so no two callers ever share a mutable dict or list;
- the *L2 form*: UTF-8 JSON text of that tuple (UUIDs and datetimes as
  strings), stored in Redis. Never pickle: a compromised Redis must not be
  able to run code in this process.

Hydration builds a detached instance with the class manager's
``new_instance()`` and fills its ``__dict__`` directly: no ``__init__``, no
attribute events, no history, which is what makes an L1 hit cost a few
microseconds instead of the ~15 us of a constructor call.

An L2 value is checked before it becomes an L1 row: the number of columns,
each column's Python type as its ``Mapped[...]`` annotation says (``None``
only where the column is nullable, aware datetimes for ``timezone=True``),
and the nesting depth of JSON values. Anything else (garbage, another shape,
JSON nested deeper than :data:`MAX_JSON_DEPTH`) is a ``ValueError``, which
the readers count as a corrupt value and treat as a miss.
"""

from __future__ import annotations

import json
import types
import typing
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import DateTime
from sqlalchemy.dialects.postgresql import JSON, JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import Mapper, class_mapper

from orchestrator_data.models.base import Base

ModelT = TypeVar("ModelT", bound=Base)

#: An immutable row: what L1 holds.
Row = tuple[Any, ...]

_PLAIN, _UUID, _DATETIME, _JSON = 0, 1, 2, 3

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads

#: JSON values nested deeper than this are refused when read from L2: the
#: copies made at every hydration recurse, and must never hit Python's
#: recursion limit.
MAX_JSON_DEPTH = 200

#: (position, the exact types a column's value may have, NoneType included
#: where it is nullable), for the columns whose type is known.
_Check = tuple[int, frozenset[type]]


def _kind(column_type: Any) -> int:
    if isinstance(column_type, PG_UUID):
        return _UUID
    if isinstance(column_type, DateTime):
        return _DATETIME
    if isinstance(column_type, (JSON, JSONB)):
        return _JSON
    return _PLAIN


class RowCodec(Generic[ModelT]):
    """Converts between the three forms of one model's rows."""

    def __init__(self, model: type[ModelT]) -> None:
        mapper: Mapper[Any] = class_mapper(model)
        self.model = model
        self.entity: str = model.__entity__
        self.keys: tuple[str, ...] = tuple(attr.key for attr in mapper.column_attrs)
        self.kinds: tuple[int, ...] = tuple(
            _kind(attr.columns[0].type) for attr in mapper.column_attrs
        )
        self._pk_index = self.keys.index(mapper.primary_key[0].key)
        self._json_positions = tuple(i for i, k in enumerate(self.kinds) if k == _JSON)
        self._uuid_positions = tuple(i for i, k in enumerate(self.kinds) if k == _UUID)
        self._datetime_positions = tuple(i for i, k in enumerate(self.kinds) if k == _DATETIME)
        self._json_keys = tuple(self.keys[i] for i in self._json_positions)
        self._new_instance = mapper.class_manager.new_instance
        self._identity_class = mapper.identity_key_from_primary_key((uuid.UUID(int=0),))[0]
        self._type_checks, self._aware_positions = _column_checks(model, mapper)

    # -- instance <-> L1 ------------------------------------------------------

    def from_instance(self, obj: ModelT) -> Row:
        """The L1 form of a loaded instance (JSON values copied)."""
        d = obj.__dict__
        return tuple(
            copy_json(d[k]) if kind == _JSON else d[k]
            for k, kind in zip(self.keys, self.kinds)  # noqa: B905 - same length by construction
        )

    def hydrate(self, row: Row) -> ModelT:
        """A new detached instance holding ``row``; its JSON values are fresh
        objects, so the caller may mutate them without affecting anyone."""
        obj: ModelT = self._new_instance()
        d = obj.__dict__
        d.update(zip(self.keys, row))  # noqa: B905 - same length by construction
        for k in self._json_keys:
            d[k] = copy_json(d[k])
        # A detached object with an identity, as after Session.expunge(): it
        # can be merged into a session, and never lazy-loads (every column is set).
        state = obj._sa_instance_state  # type: ignore[attr-defined]
        state.key = (self._identity_class, (row[self._pk_index],), None)
        return obj

    def ident_of(self, row: Row) -> uuid.UUID:
        ident: uuid.UUID = row[self._pk_index]
        return ident

    # -- L1 <-> L2 ------------------------------------------------------------

    def dumps(self, row: Row) -> str:
        """The L2 form (JSON text) of an L1 row."""
        return _dumps([_to_json(v, kind) for v, kind in zip(row, self.kinds)])  # noqa: B905

    def loads(self, text: str | bytes) -> Row:
        """The L1 row of an L2 value; ValueError if it is not one of ours."""
        return self.from_json(loads(text))

    def to_json(self, row: Row) -> list[Any]:
        return [_to_json(v, kind) for v, kind in zip(row, self.kinds)]  # noqa: B905

    def from_json(self, values: Any) -> Row:
        """The L1 row of decoded L2 JSON; ValueError unless every column has
        the type its model declares."""
        if not isinstance(values, list) or len(values) != len(self.kinds):
            raise ValueError(f"not a cached {self.entity} row")
        # Convert only the columns that need it (this is the L2-hit path).
        try:
            for i in self._uuid_positions:
                v = values[i]
                if v is not None:
                    values[i] = uuid.UUID(v)
            for i in self._datetime_positions:
                v = values[i]
                if v is not None:
                    values[i] = datetime.fromisoformat(v)
        except (TypeError, AttributeError) as err:
            raise ValueError(f"not a cached {self.entity} row") from err
        for i, accepted in self._type_checks:
            if type(values[i]) not in accepted:
                raise ValueError(f"not a cached {self.entity} row ({self.keys[i]})")
        for i in self._aware_positions:
            v = values[i]
            if v is not None and v.tzinfo is None:
                raise ValueError(f"not a cached {self.entity} row ({self.keys[i]})")
        for i in self._json_positions:
            v = values[i]
            if type(v) in _CONTAINERS and _too_deep(v):
                raise ValueError(f"cached {self.entity} {self.keys[i]} nested too deeply")
        return tuple(values)


def copy_json(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars), ~4x cheaper than
    ``copy.deepcopy`` or a JSON round trip for the small documents of rows."""
    t = type(value)
    if t is dict:
        return {k: v if type(v) not in _CONTAINERS else copy_json(v) for k, v in value.items()}
    if t is list:
        return [v if type(v) not in _CONTAINERS else copy_json(v) for v in value]
    if isinstance(value, dict):  # MutableDict and other subclasses
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    return value


_CONTAINERS = (dict, list)


def _too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON container ``value`` nests containers deeper than ``limit``
    (iterative; a flat container, the usual case, costs one pass)."""
    children = value.values() if type(value) is dict else value
    stack = [(c, 2) for c in children if type(c) in _CONTAINERS]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        children = v.values() if type(v) is dict else v
        stack.extend((c, depth + 1) for c in children if type(c) in _CONTAINERS)
    return False


def _column_checks(
    model: type[Base], mapper: Mapper[Any]
) -> tuple[tuple[_Check, ...], tuple[int, ...]]:
    """The type check of every column whose ``Mapped[...]`` annotation names
    its type, and the positions of ``timezone=True`` datetimes."""
    try:
        hints = typing.get_type_hints(model)
    except (NameError, TypeError):  # pragma: no cover - an unresolvable annotation
        hints = {}
    checks: list[_Check] = []
    aware: list[int] = []
    for i, attr in enumerate(mapper.column_attrs):
        column = attr.columns[0]
        inner = typing.get_args(hints.get(attr.key)) or (Any,)
        allowed, nullable = _accepted(inner[0])
        if allowed is not None:
            none = (type(None),) if nullable or column.nullable else ()
            checks.append((i, frozenset((*allowed, *none))))
        if isinstance(column.type, DateTime) and column.type.timezone:
            aware.append(i)
    return tuple(checks), tuple(aware)


def _accepted(hint: Any) -> tuple[tuple[type, ...] | None, bool]:
    """(exact types accepted, None allowed) for a ``Mapped[...]`` argument."""
    if hint is Any:
        return None, True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        nullable = len(options) < len(typing.get_args(hint))
        accepted: list[type] = []
        for option in options:
            sub, _ = _accepted(option)
            if sub is None:
                return None, True
            accepted.extend(sub)
        return tuple(accepted), nullable
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return (float, int), False
    if isinstance(origin, type):
        return (origin,), False
    return None, True


def _to_json(value: Any, kind: int) -> Any:
    if value is None or kind in (_PLAIN, _JSON):
        return value
    if kind == _UUID:
        return str(value)
    assert isinstance(value, datetime)
    return value.isoformat()


def dumps(value: Any) -> str:
    """Compact JSON text (the one encoder of the cache)."""
    return _dumps(value)


def loads(text: str | bytes) -> Any:
    """Decoded JSON; ValueError for anything that is not JSON (deeply nested
    arrays included, which the decoder would refuse with RecursionError)."""
    try:
        return _loads(text)
    except RecursionError as err:
        raise ValueError("JSON nested too deeply") from err


def rows_to_json(codec: RowCodec[Any], rows: Sequence[Row]) -> list[list[Any]]:
    return [codec.to_json(r) for r in rows]


def rows_from_json(codec: RowCodec[Any], values: Any) -> tuple[Row, ...]:
    if not isinstance(values, list):
        raise ValueError("malformed cached rows")
    return tuple(codec.from_json(v) for v in values)
