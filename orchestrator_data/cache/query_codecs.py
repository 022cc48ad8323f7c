"""How query results are cached: an immutable L1 form, shared by every
reader, and a JSON form for L2. Readers always get fresh objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

from orchestrator_data.cache import serialization
from orchestrator_data.cache.serialization import RowCodec
from orchestrator_data.models import Base

ModelT = TypeVar("ModelT", bound=Base)
Q = TypeVar("Q")


class QueryCodec(Protocol[Q]):
    """How a query result is cached: an immutable L1 form and a JSON form."""

    def to_l1(self, value: Q) -> Any: ...
    def from_l1(self, frozen: Any) -> Q: ...
    def to_json(self, frozen: Any) -> Any: ...
    def from_json(self, data: Any) -> Any: ...


class ScalarCodec:
    """A number (a count): immutable as it is. ``types`` are the exact types
    a cached value may have; anything else in L2 (a string where a count
    belongs, a boolean) is refused as corrupt."""

    def __init__(self, types: tuple[type, ...] = (int,)) -> None:
        self.types = types

    def to_l1(self, value: Any) -> Any:
        return value

    def from_l1(self, frozen: Any) -> Any:
        return frozen

    def to_json(self, frozen: Any) -> Any:
        return frozen

    def from_json(self, data: Any) -> Any:
        if type(data) not in self.types:
            raise ValueError("malformed cached scalar")
        return data


class RowsCodec(Generic[ModelT]):
    """A list of model rows and an optional page cursor."""

    def __init__(self, codec: RowCodec[ModelT]) -> None:
        self.codec = codec

    def to_l1(self, value: tuple[Sequence[ModelT], str | None]) -> Any:
        items, cursor = value
        return tuple(self.codec.from_instance(o) for o in items), cursor

    def from_l1(self, frozen: Any) -> tuple[list[ModelT], str | None]:
        rows, cursor = frozen
        return [self.codec.hydrate(r) for r in rows], cursor

    def to_json(self, frozen: Any) -> Any:
        rows, cursor = frozen
        return [serialization.rows_to_json(self.codec, rows), cursor]

    def from_json(self, data: Any) -> Any:
        if not isinstance(data, list) or len(data) != 2:
            raise ValueError("malformed cached rows")
        cursor = data[1]
        if cursor is not None and not isinstance(cursor, str):
            raise ValueError("malformed cached cursor")
        return serialization.rows_from_json(self.codec, data[0]), cursor


#: Counts (``Repository.count``): integers only.
SCALAR = ScalarCodec((int,))
