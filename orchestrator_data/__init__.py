"""orchestrator_data: the PostgreSQL + Redis persistence layer of a
multi-agent orchestration system.

Nothing connects or reads the environment at import time: build a
:class:`DataLayer` from :class:`Settings` when the application starts.
Names whose modules need SQLAlchemy or Redis (``DataLayer``, ``Settings``,
``UnitOfWork``, ...) are loaded on first use, so that importing a light part
of the package (the CLI's ``--help``, the errors) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from orchestrator_data.actor import Actor, acting_as, current_actor
from orchestrator_data.correlation import correlated, current_correlation_id
from orchestrator_data.errors import (
    ConfigurationError,
    ConflictError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
    EmbeddedServerError,
    LockLostError,
    LockNotAcquiredError,
    MigrationError,
    NotFoundError,
    OrchestratorDataError,
    RateLimitedError,
    ReadSkewError,
    RetryExhaustedError,
    SessionConflictError,
    SessionStoreUnavailableError,
    UncapturedWriteError,
    ValidationError,
)
from orchestrator_data.pagination import Page

if TYPE_CHECKING:
    from orchestrator_data.config import CacheTTLs, Settings
    from orchestrator_data.datalayer import DataLayer
    from orchestrator_data.uow import UnitOfWork

#: Public names loaded on first access, and the module of each.
_LAZY = {
    "CacheTTLs": "orchestrator_data.config",
    "Settings": "orchestrator_data.config",
    "DataLayer": "orchestrator_data.datalayer",
    "UnitOfWork": "orchestrator_data.uow",
}

__all__ = [
    "Actor",
    "CacheTTLs",
    "ConfigurationError",
    "ConflictError",
    "DataLayer",
    "DatabaseTimeoutError",
    "DatabaseUnavailableError",
    "EmbeddedServerError",
    "LockLostError",
    "LockNotAcquiredError",
    "MigrationError",
    "NotFoundError",
    "OrchestratorDataError",
    "Page",
    "RateLimitedError",
    "ReadSkewError",
    "RetryExhaustedError",
    "SessionConflictError",
    "SessionStoreUnavailableError",
    "Settings",
    "UncapturedWriteError",
    "UnitOfWork",
    "ValidationError",
    "acting_as",
    "correlated",
    "current_actor",
    "current_correlation_id",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
