"""orchestrator_data: the PostgreSQL + Redis persistence layer of a
multi-agent orchestration system.

Nothing connects or reads the environment at import time: build a
:class:`DataLayer` from :class:`Settings` when the application starts.
"""

from orchestrator_data.actor import Actor, acting_as, current_actor
from orchestrator_data.config import CacheTTLs, Settings
from orchestrator_data.correlation import correlated, current_correlation_id
from orchestrator_data.datalayer import DataLayer
from orchestrator_data.errors import (
    ConfigurationError,
    ConflictError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
    EmbeddedServerError,
    LockLostError,
    LockNotAcquiredError,
    NotFoundError,
    OrchestratorDataError,
    RateLimitedError,
    RetryExhaustedError,
    UncapturedWriteError,
    ValidationError,
)
from orchestrator_data.pagination import Page
from orchestrator_data.uow import UnitOfWork

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
    "NotFoundError",
    "OrchestratorDataError",
    "Page",
    "RateLimitedError",
    "RetryExhaustedError",
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
