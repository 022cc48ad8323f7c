"""The generic typed repository: validated CRUD, filters, keyset pagination.

A repository never commits: the unit of work owns the transaction. Driver
errors are translated at the engine boundary (see ``db.driver_errors``), so a
duplicate name surfaces here as ``ConflictError``.
"""

from __future__ import annotations

import builtins
import functools
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.cache.invalidation import ROW_CACHED
from orchestrator_data.cache.layer import INFO_CACHE
from orchestrator_data.cache.query_codecs import SCALAR
from orchestrator_data.errors import NotFoundError, ValidationError
from orchestrator_data.models.base import Base, to_dict
from orchestrator_data.pagination import Page, decode_cursor, encode_cursor
from orchestrator_data.repositories import _checks
from orchestrator_data.schemas import rules
from orchestrator_data.schemas.base import EntitySchema, field_value, load

if TYPE_CHECKING:
    from orchestrator_data.cache.layer import Cache
    from orchestrator_data.cache.query_codecs import QueryCodec

ModelT = TypeVar("ModelT", bound=Base)
Q = TypeVar("Q")

MAX_PAGE_SIZE = 1000


@functools.cache
def _schema(schema_type: type[EntitySchema]) -> EntitySchema:
    # Building a marshmallow schema costs ~100 µs; loading keeps no state on
    # the instance, so one per class serves every repository and thread.
    return schema_type()


def coerce_uuid(value: object, field: str = "id") -> uuid.UUID:
    """``value`` as a UUID, or a ValidationError naming ``field``."""
    return rules.checked(field, rules.uuid_value, value)


class Repository(Generic[ModelT]):
    """CRUD and queries over one model, validated by its marshmallow schema.

    Subclasses set ``model_type``, ``schema_type`` and ``sortable`` and
    override :meth:`_filter` for their entity's filters.
    """

    model_type: ClassVar[type[Base]]
    schema_type: ClassVar[type[EntitySchema]]
    #: Columns ``list(order_by=...)`` accepts; ``id`` always breaks ties.
    sortable: ClassVar[frozenset[str]] = frozenset({"created_at"})
    default_order: ClassVar[str] = "created_at"
    #: Fields that ``update`` refuses (identity and bookkeeping).
    immutable: ClassVar[frozenset[str]] = frozenset({"id", "created_at", "updated_at"})

    def __init__(self, *, session: OrmSession) -> None:
        self.session = session
        self._schema = _schema(self.schema_type)

    @property
    def entity(self) -> str:
        return self.model_type.__entity__

    # -- reads ---------------------------------------------------------------

    def get(
        self, ident: uuid.UUID | str, *, cached: bool | None = None, for_update: bool = False
    ) -> ModelT | None:
        """The row with primary key ``ident``, or ``None``.

        Read-only units of work read through the cache (L1, L2, then
        PostgreSQL); others read PostgreSQL. ``cached=True`` asks for a cached
        read anyway (the last committed value, outside the transaction's
        snapshot and SSI), ``cached=False`` refuses one. ``for_update=True``
        locks the row (``SELECT ... FOR UPDATE``) and never uses the cache.
        A row served from the cache is a detached copy of its own.
        """
        key = coerce_uuid(ident)
        session = self.session
        if for_update:
            locked: ModelT | None = session.get(self.model_type, key, with_for_update=True)  # type: ignore[assignment]
            return locked
        cache: Cache | None = session.info.get(INFO_CACHE)
        if cache is None or self.entity not in ROW_CACHED:
            obj: ModelT | None = session.get(self.model_type, key)  # type: ignore[assignment]
            return obj
        row: ModelT | None = cache.get_row(session, self.model_type, key, cached=cached)  # type: ignore[assignment]
        return row

    def get_or_raise(self, ident: uuid.UUID | str, *, cached: bool | None = None) -> ModelT:
        """The row with primary key ``ident``; :class:`NotFoundError` if absent."""
        obj = self.get(ident, cached=cached)
        if obj is None:
            raise NotFoundError(self.entity, ident)
        return obj

    def invalidate_caches(self) -> None:
        """Drop every cached row and query result of this entity, in every
        process (for data changed behind the data layer's back)."""
        cache: Cache | None = self.session.info.get(INFO_CACHE)
        if cache is not None:
            cache.invalidate([(self.entity, None, "update")])

    def _cached(
        self,
        parts: Sequence[Any],
        load: Callable[[], Q],
        codec: QueryCodec[Q] | None,
        cached: bool | None,
    ) -> Q:
        """``load()`` through the query cache of this entity (see cache.layer)."""
        cache: Cache | None = self.session.info.get(INFO_CACHE)
        if cache is None or self.entity not in cache.codecs:
            return load()  # not a cached entity (audit rows)
        if codec is None:
            codec = cache.rows_codecs[self.entity]  # type: ignore[assignment]
            assert codec is not None
        return cache.get_query(self.session, self.entity, parts, load, codec, cached=cached)

    def _scalar(self, parts: Sequence[Any], load: Callable[[], Q], cached: bool | None) -> Q:
        return self._cached(parts, load, cast("QueryCodec[Q]", SCALAR), cached)

    def _rows(
        self,
        parts: Sequence[Any],
        load: Callable[[], tuple[builtins.list[ModelT], str | None]],
        cached: bool | None,
    ) -> tuple[builtins.list[ModelT], str | None]:
        return self._cached(parts, load, None, cached)

    def list(
        self,
        *,
        limit: int = 50,
        after: str | None = None,
        order_by: str | None = None,
        descending: bool = False,
        cached: bool | None = None,
        **filters: Any,
    ) -> Page[ModelT]:
        """A page of rows matching ``filters``, in a stable order
        (``order_by`` then ``id``). Pass the returned ``next_cursor`` as
        ``after`` to continue; rows inserted meanwhile never shift pages.
        ``cached`` as for :meth:`get`. Every argument is validated (a
        ValidationError naming it) before the cache or the database is asked."""
        _checks.integer("limit", limit, 1, MAX_PAGE_SIZE)
        order = self._order(order_by)
        _checks.boolean("descending", descending)
        _checks.optional_boolean("cached", cached)
        clauses = self._where(filters)
        if after is not None:
            clauses.append(self._keyset(after, order, descending))
        parts = ("list", limit, after, order, descending, filters)
        rows, cursor = self._rows(
            parts, lambda: self._load_page(limit, order, descending, clauses), cached
        )
        return Page(rows, cursor)

    def _order(self, order_by: object) -> str:
        if order_by is None:
            return self.default_order
        if not isinstance(order_by, str) or order_by not in self.sortable:
            raise ValidationError(
                {"order_by": [f"Must be one of: {', '.join(sorted(self.sortable))}."]},
                entity=self.entity,
            )
        return order_by

    def _keyset(self, after: str, order: str, descending: bool) -> ColumnElement[bool]:
        """Rows after the cursor ``after`` in the order (``order``, ``id``).

        The cursor's value is checked with ``order``'s field, as any filter
        value would be: a cursor made for another order, or forged, is a
        ValidationError naming ``after``. Nullable columns sort NULLs last
        ascending and first descending (PostgreSQL's default), and a NULL in
        the cursor is a position like any other.
        """
        raw, last_id = decode_cursor(after)
        try:
            value = field_value(self._schema, order, raw, name="after", entity=self.entity)
        except ValidationError:
            raise ValidationError(
                {"after": [f"Not a valid cursor for order_by={order!r}."]}, entity=self.entity
            ) from None
        column: InstrumentedAttribute[Any] = getattr(self.model_type, order)
        ident: InstrumentedAttribute[Any] = self.model_type.id  # type: ignore[attr-defined]
        key = tuple_(column, ident)
        if value is None:
            later_id = ident < last_id if descending else ident > last_id
            same = and_(column.is_(None), later_id)
            return or_(same, column.is_not(None)) if descending else same
        beyond = key < (value, last_id) if descending else key > (value, last_id)
        if descending or not self._nullable(order):
            return beyond
        return or_(beyond, column.is_(None))

    def _nullable(self, order: str) -> bool:
        return bool(self._schema.fields[order].allow_none)

    def _load_page(
        self,
        limit: int,
        order: str,
        descending: bool,
        clauses: Sequence[ColumnElement[bool]],
    ) -> tuple[builtins.list[ModelT], str | None]:
        column: InstrumentedAttribute[Any] = getattr(self.model_type, order)
        ident: InstrumentedAttribute[Any] = self.model_type.id  # type: ignore[attr-defined]
        stmt = select(self.model_type).where(*clauses)
        if descending:
            stmt = stmt.order_by(column.desc(), ident.desc())
        else:
            stmt = stmt.order_by(column.asc(), ident.asc())
        rows: list[ModelT] = list(self.session.scalars(stmt.limit(limit + 1)))
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_cursor = encode_cursor(getattr(last, order), last.id)  # type: ignore[attr-defined]
        return rows, next_cursor

    def count(self, *, cached: bool | None = None, **filters: Any) -> int:
        """Number of rows matching ``filters`` (the same filters as :meth:`list`)."""
        _checks.optional_boolean("cached", cached)
        clauses = self._where(filters)

        def load() -> int:
            stmt = select(func.count()).select_from(self.model_type).where(*clauses)
            return int(self.session.scalar(stmt) or 0)

        return self._scalar(("count", filters), load, cached)

    # -- writes --------------------------------------------------------------

    def create(self, **fields: Any) -> ModelT:
        """Validate ``fields`` (design field names), insert, flush, return the row.
        Raises ValidationError (nothing written) or ConflictError."""
        values = load(self._schema, fields, partial=False, entity=self.entity)
        obj: ModelT = self.model_type(**values)  # type: ignore[assignment]
        self.session.add(obj)
        self.session.flush()
        return obj

    def update(self, ident: uuid.UUID | str, **fields: Any) -> ModelT:
        """Validate and apply ``fields`` to the row ``ident``; flush; return it."""
        key = coerce_uuid(ident)
        refused = self.immutable.intersection(fields)
        if refused:
            raise ValidationError({f: ["Cannot be changed."] for f in refused}, entity=self.entity)
        values = load(self._schema, fields, partial=True, entity=self.entity)
        obj = self.get_or_raise(key, cached=False)
        for attr, value in values.items():
            setattr(obj, attr, value)
        self.session.flush()
        return obj

    def delete(self, ident: uuid.UUID | str) -> None:
        """Delete the row ``ident``; NotFoundError if absent."""
        obj = self.get_or_raise(ident, cached=False)
        self.session.delete(obj)
        self.session.flush()

    # -- serialization -------------------------------------------------------

    def dump(self, obj: ModelT) -> dict[str, Any]:
        """``obj`` as JSON-ready data under the design's field names."""
        data: dict[str, Any] = self._schema.dump(obj)
        return data

    def as_dict(self, obj: ModelT) -> dict[str, Any]:
        """``obj``'s column values (Python types) under the design's field names."""
        return to_dict(obj)

    # -- filters -------------------------------------------------------------

    def _select(self, filters: Mapping[str, Any]) -> Select[Any]:
        return select(self.model_type).where(*self._where(filters))

    def _where(self, filters: Mapping[str, Any]) -> builtins.list[ColumnElement[bool]]:
        clauses: builtins.list[ColumnElement[bool]] = []
        problems: dict[str, builtins.list[str]] = {}
        for name, value in filters.items():
            if value is None:
                continue
            try:
                clause = self._filter(name, value)
            except ValidationError as err:
                problems.update(err.messages)
                continue
            if clause is None:
                problems[name] = ["Unknown filter."]
            else:
                clauses.append(clause)
        if problems:
            raise ValidationError(problems, entity=self.entity)
        return clauses

    def _filter(self, name: str, value: Any) -> ColumnElement[bool] | None:
        """The WHERE clause for filter ``name``; ``None`` if there is no such filter.
        Subclasses extend this; the base knows ``created_after`` / ``created_before``."""
        created: InstrumentedAttribute[Any] | None = getattr(self.model_type, "created_at", None)
        if created is not None and name == "created_after":
            return cast("ColumnElement[bool]", created >= self._check(name, value, "created_at"))
        if created is not None and name == "created_before":
            return cast("ColumnElement[bool]", created < self._check(name, value, "created_at"))
        return None

    def _check(self, name: str, value: Any, field: str | None = None) -> Any:
        """Filter ``name``'s ``value``, validated by the schema field ``field``
        (default: the field called ``name``), the very rules of create and
        update; a ValidationError naming ``name``."""
        return field_value(self._schema, field or name, value, name=name, entity=self.entity)

    def _equals(
        self, column: InstrumentedAttribute[Any], name: str, value: Any, field: str | None = None
    ) -> ColumnElement[bool]:
        """``column = value``, ``value`` checked as filter ``name`` (see :meth:`_check`)."""
        clause: ColumnElement[bool] = column == self._check(name, value, field)
        return clause

    def _check_each(self, name: str, value: Any, field: str | None = None) -> builtins.list[Any]:
        """:meth:`_check` for a filter that takes one value or a list of them."""
        return [self._check(name, v, field) for v in _checks.values(value)]
