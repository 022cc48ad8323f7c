"""A captured change: one row created, updated or deleted, with its values."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator_data.models.base import Base

Action = Literal["create", "update", "delete"]

#: Columns never reported as changed on update: bookkeeping, not content.
IGNORED_ON_UPDATE = frozenset({"updated_at"})


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


def snapshot_row(keys: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    # Table column keys are the database column names, which are the public
    # field names (``metadata``), so no renaming is needed here.
    return {k: snapshot(v) for k, v in zip(keys, row, strict=True)}


def snapshot(value: Any) -> Any:
    # JSON values are mutable: the record must not change when the caller
    # mutates the object afterwards.
    return copy.deepcopy(value) if isinstance(value, (dict, list)) else value
