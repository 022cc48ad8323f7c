"""What a committed change invalidates.

A change of entity E with id I invalidates the key ``cache:E:I`` and bumps
E's generation (every cached query over E becomes unreachable, which is the
"pattern" clearing of the design without any SCAN). Database-side cascades
the ORM never sees are declared here: deleting an agent sets ``tasks.agent_id``
to NULL and deletes its achievements, so it also bumps the generations of
tasks and achievements and the epoch of task values (every cached task row
is voided, since any of them may have pointed at the agent).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

#: entity -> (entities whose queries a delete affects, entities whose cached rows it voids)
DELETE_CASCADES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "agent": (("task", "achievement"), ("task",)),
}

#: Every cached entity (each has a generation).
ENTITIES = ("agent", "task", "session", "achievement")

#: Entities whose rows are cached under ``cache:{entity}:{id}``.
ROW_CACHED = frozenset({"agent", "task", "session"})


@dataclass
class Targets:
    """Keys and counters one commit invalidates."""

    rows: set[tuple[str, uuid.UUID]] = field(default_factory=set)
    generations: set[str] = field(default_factory=set)
    epochs: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.rows or self.generations or self.epochs)

    @classmethod
    def everything(cls) -> Targets:
        """Every generation and epoch: voids every cached value."""
        return cls(generations=set(ENTITIES), epochs=set(ROW_CACHED))


def targets(items: Iterable[tuple[str, uuid.UUID | None, str]]) -> Targets:
    """The targets of ``(entity, id, action)`` items; ``id=None`` means every
    row of the entity (``action`` is "create", "update" or "delete")."""
    out = Targets()
    for entity, ident, action in items:
        out.generations.add(entity)
        if entity in ROW_CACHED:
            if ident is None:
                out.epochs.add(entity)
            else:
                out.rows.add((entity, ident))
        if action == "delete" and entity in DELETE_CASCADES:
            queries, rows = DELETE_CASCADES[entity]
            out.generations.update(queries)
            out.epochs.update(rows)
    return out
