"""Who is acting: lands on every audit row a unit of work writes."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from orchestrator_data.errors import ValidationError
from orchestrator_data.schemas import rules

#: Column lengths of ``audit_logs.actor_type`` and ``audit_logs.actor_id``
#: (a unit test holds them equal to the model's).
ACTOR_TYPE_MAX_LENGTH = 50
ACTOR_ID_MAX_LENGTH = 255


@dataclass(frozen=True)
class Actor:
    """The acting party: ``type`` (``user``, ``agent``, ``service``, ``system``),
    its ``id`` and, when known, the client ``ip``.

    Validated when made, by the rules of the audit columns it lands in:
    ``type`` 1 to 50 characters, ``id`` 1 to 255 (or ``None``), ``ip`` an
    IPv4 or IPv6 address (or ``None``), kept in canonical form; text without
    NUL or unpaired surrogates. Otherwise a :class:`ValidationError` naming
    ``actor.type``, ``actor.id`` or ``actor.ip``.
    """

    type: str
    id: str | None = None
    ip: str | None = None

    def __post_init__(self) -> None:
        problems: dict[str, list[str]] = {}
        ip = self.ip
        try:
            rules.text(self.type, min_length=1, max_length=ACTOR_TYPE_MAX_LENGTH)
        except rules.Invalid as err:
            problems["actor.type"] = [str(err)]
        try:
            if self.id is not None:
                rules.text(self.id, min_length=1, max_length=ACTOR_ID_MAX_LENGTH)
        except rules.Invalid as err:
            problems["actor.id"] = [str(err)]
        try:
            if ip is not None:
                ip = rules.ip_address(ip)
        except rules.Invalid as err:
            problems["actor.ip"] = [str(err)]
        if problems:
            raise ValidationError(problems)
        if ip != self.ip:
            object.__setattr__(self, "ip", ip)  # frozen: the canonical form, set once

    @staticmethod
    def checked(actor: object) -> Actor | None:
        """``actor`` if it is an Actor (or ``None``); else a ValidationError
        naming ``actor``, before anything is written under a wrong name."""
        if actor is None or isinstance(actor, Actor):
            return actor
        raise ValidationError({"actor": [f"Must be an Actor, not {type(actor).__name__}."]})


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
    token = _current.set(Actor.checked(actor) or SYSTEM)
    try:
        yield actor
    finally:
        _current.reset(token)
