"""Correlation ids: tie the audit rows of one request, job or saga together."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "orchestrator_data_correlation_id", default=None
)


def current_correlation_id() -> str | None:
    """The id set by :func:`correlated` in this context, else ``None``."""
    return _current.get()


@contextmanager
def correlated(correlation_id: str) -> Iterator[str]:
    """Stamp every unit of work opened inside the block with ``correlation_id``
    (in the ``metadata`` of its audit rows), unless it passes its own.

    A contextvar, like :func:`~orchestrator_data.acting_as`: it never leaks
    into other threads.
    """
    if not isinstance(correlation_id, str) or not correlation_id:
        raise ValueError("correlation_id must be a non-empty string")
    token = _current.set(correlation_id)
    try:
        yield correlation_id
    finally:
        _current.reset(token)
