"""Schema plumbing: strict marshmallow schemas that raise our ValidationError,
and the fields that apply :mod:`~orchestrator_data.schemas.rules`.

Every field checks its value with the rules, and :func:`field_for` derives a
column's field from the model (``String(n)`` -> at most n characters,
``Integer`` -> the 32-bit range, ``nullable`` -> ``allow_none``), so a limit
is written once, on the model. The repositories validate filter values and
cursors with these same fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import marshmallow
from marshmallow import RAISE, Schema, fields
from sqlalchemy import BigInteger, Column, DateTime, Integer, SmallInteger, String
from sqlalchemy.dialects.postgresql import INET
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import ColumnProperty, QueryableAttribute

from orchestrator_data.errors import ValidationError
from orchestrator_data.schemas import rules

T = TypeVar("T")


def _apply(check: Callable[..., T], value: Any, *args: Any, **kw: Any) -> T:
    # A rule's Invalid as marshmallow's error, so the schema collects it per field.
    try:
        return check(value, *args, **kw)
    except rules.Invalid as err:
        raise marshmallow.ValidationError(str(err)) from None


class Text(fields.String):
    """A string PostgreSQL can store (no NUL, no unpaired surrogate) of
    ``min_length`` to ``max_length`` characters."""

    def __init__(
        self, *, min_length: int = 0, max_length: int | None = rules.MAX_TEXT_LENGTH, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.min_length = min_length
        self.max_length = max_length

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return _apply(rules.text, value, min_length=self.min_length, max_length=self.max_length)


class Int(fields.Integer):
    """An int (never a bool, a float or a numeric string) between ``low`` and ``high``."""

    def __init__(self, *, low: int, high: int, **kw: Any) -> None:
        super().__init__(strict=True, **kw)
        self.low = low
        self.high = high

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return _apply(rules.integer, value, self.low, self.high)


class AwareDateTime(fields.AwareDateTime):
    """An aware datetime (or ISO 8601 text with an offset), returned in UTC;
    naive ones are refused (see :func:`rules.aware_datetime`)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            _apply(rules.text, value, max_length=64)
            value = super()._deserialize(value, attr, data, **kwargs)
        return _apply(rules.aware_datetime, value)


class UUID(fields.UUID):
    """A UUID, or its text form."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return _apply(rules.uuid_value, value)


class JSONValue(fields.Raw):
    """Any JSON value (object, array, string, number, ...) within the JSON
    rules: see :func:`rules.json_value`."""

    def __init__(self, *, max_size: int = rules.MAX_JSON_SIZE, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_size = max_size

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return _apply(rules.json_value, value, max_size=self.max_size)


class JSONObject(JSONValue):
    """A JSON object: string keys, JSON values, within the JSON rules."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return _apply(rules.json_object, value, max_size=self.max_size)


class JSONArray(fields.List[Any]):
    """A JSON array (a list or tuple) of ``inner`` values, within the JSON rules."""

    def __init__(self, inner: fields.Field[Any], *, max_size: int = rules.MAX_JSON_SIZE, **kw: Any):
        super().__init__(inner, **kw)
        self.max_size = max_size

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise self.make_error("invalid")
        _apply(rules.json_value, value, max_size=self.max_size)
        return super()._deserialize(list(value), attr, data, **kwargs)


class IPAddress(fields.String):
    """An IPv4 or IPv6 address (or address/prefix), stored as its canonical text."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return _apply(rules.ip_address, value)


def _column(attr: QueryableAttribute[Any]) -> Column[Any]:
    prop = attr.property
    assert isinstance(prop, ColumnProperty), f"{attr} is not a column"
    column = prop.columns[0]
    assert isinstance(column, Column), f"{attr} is not a table column"
    return column


def int_range(column_type: Integer) -> tuple[int, int]:
    """The values a PostgreSQL integer column of ``column_type`` can hold."""
    if isinstance(column_type, BigInteger):
        return rules.BIGINT
    if isinstance(column_type, SmallInteger):
        return rules.SMALLINT
    return rules.INTEGER


def field_for(
    attr: QueryableAttribute[Any],
    *,
    min_length: int = 0,
    low: int | None = None,
    high: int | None = None,
    **kw: Any,
) -> fields.Field[Any]:
    """The field of the model column ``attr``, with the column's limits:
    ``String(n)`` at most n characters (``Text``: ``MAX_TEXT_LENGTH``),
    integers the column type's range (narrowed by ``low`` / ``high``, as the
    column's CHECK constraint says), aware datetimes, UUIDs, INET addresses;
    ``allow_none`` when the column is nullable. ``kw`` goes to the field."""
    column = _column(attr)
    kw.setdefault("allow_none", bool(column.nullable))
    kind = column.type
    if isinstance(kind, String):
        return Text(min_length=min_length, max_length=kind.length or rules.MAX_TEXT_LENGTH, **kw)
    if isinstance(kind, Integer):
        lowest, highest = int_range(kind)
        return Int(
            low=lowest if low is None else max(low, lowest),
            high=highest if high is None else min(high, highest),
            **kw,
        )
    if isinstance(kind, DateTime):
        assert kind.timezone, f"{attr}: timestamps are stored with time zone"
        return AwareDateTime(**kw)
    if isinstance(kind, PG_UUID):
        return UUID(**kw)
    if isinstance(kind, INET):
        return IPAddress(**kw)
    raise TypeError(f"{attr}: no field for a {type(kind).__name__} column; declare one")


class EntitySchema(Schema):
    """Base of the entity schemas: unknown fields are an error, and load
    returns model attribute names (``metadata`` -> ``metadata_``)."""

    #: Fields a caller may not set on create or update.
    read_only_fields: ClassVar[frozenset[str]] = frozenset({"id", "created_at", "updated_at"})

    class Meta:
        unknown = RAISE


def load(
    schema: EntitySchema, data: Mapping[str, Any], *, partial: bool, entity: str
) -> dict[str, Any]:
    """Validate ``data``; return it keyed by model attribute names.

    Raises :class:`ValidationError` naming every bad field.
    """
    try:
        result: dict[str, Any] = schema.load(dict(data), partial=partial)
    except marshmallow.ValidationError as err:
        raise ValidationError(messages_of(err), entity=entity) from None
    return result


def messages_of(err: marshmallow.ValidationError) -> dict[str, Any]:
    """marshmallow's messages by field (``_schema`` for schema-level ones)."""
    return err.messages if isinstance(err.messages, dict) else {"_schema": err.messages}


def field_value(
    schema: EntitySchema, field: str, value: Any, *, name: str, entity: str | None = None
) -> Any:
    """``value`` validated by ``schema``'s field ``field`` (the rules of create
    and update), or a :class:`ValidationError` naming ``name``."""
    try:
        return schema.fields[field].deserialize(value)
    except marshmallow.ValidationError as err:
        messages = err.messages if isinstance(err.messages, list) else [str(err.messages)]
        raise ValidationError({name: messages}, entity=entity) from None
