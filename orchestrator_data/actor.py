"""Who is acting: lands on every audit row a unit of work writes."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    """The acting party: ``type`` (``user``, ``agent``, ``service``, ``system``),
    its ``id`` and, when known, the client ``ip``."""

    type: str
    id: str | None = None
    ip: str | None = None


SYSTEM = Actor("system")

_current: contextvars.ContextVar[Actor | None] = contextvars.ContextVar(
    "orchestrator_data_actor", default=None
)


def current_actor() -> Actor:
    """The actor set by :func:`acting_as` in this context, else :data:`SYSTEM`."""
    return _current.get() or SYSTEM


@contextmanager
def acting_as(actor: Actor) -> Iterator[Actor]:
    """Set the actor for code that does not pass one to ``unit_of_work``.

    A contextvar: it never leaks into other threads or asyncio tasks.
    """
    token = _current.set(actor)
    try:
        yield actor
    finally:
        _current.reset(token)
