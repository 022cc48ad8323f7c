"""DataLayer: the composition root. Builds the engine, the session factory,
the Redis clients and the hooks from Settings, and hands out units of work."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis as redis_lib
from redis import Redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from orchestrator_data.achievements.awards import Awards
from orchestrator_data.achievements.stats import StatsCache
from orchestrator_data.actor import Actor, current_actor
from orchestrator_data.audit.trail import AuditTrail
from orchestrator_data.cache import Cache, CacheRegions
from orchestrator_data.cache.layer import INFO_CACHE
from orchestrator_data.cache.stats import CacheCollector
from orchestrator_data.capture.change_capture import ChangeCapture
from orchestrator_data.capture.session import CapturedSession
from orchestrator_data.config import ISOLATION_LEVELS, Settings
from orchestrator_data.coordination.change_events import install_change_events
from orchestrator_data.coordination.events import Events
from orchestrator_data.coordination.locks import Lock, LockScripts
from orchestrator_data.coordination.outbox import TransactionEvents
from orchestrator_data.coordination.presence import AgentPresence
from orchestrator_data.coordination.rate_limit import RateLimiter
from orchestrator_data.coordination.sessions import SessionStore
from orchestrator_data.correlation import current_correlation_id
from orchestrator_data.db import driver_errors
from orchestrator_data.db.engine import build_engine, warm_pool
from orchestrator_data.db.retry import run_with_retry
from orchestrator_data.errors import (
    ConfigurationError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
    MigrationError,
)
from orchestrator_data.metrics import Metrics
from orchestrator_data.models import Achievement, Agent, Task
from orchestrator_data.models import Session as SessionModel
from orchestrator_data.uow import UnitOfWork

log = logging.getLogger("orchestrator_data")

T = TypeVar("T")

# A symlink to the top-level alembic/ folder in the source tree; a real
# folder in an installed wheel (see setup.cfg's package_data).
_ALEMBIC_DIR = Path(__file__).resolve().parent / "migrations"


class DataLayer:
    """Everything the data layer needs, built from :class:`Settings`.

    Construction opens ``pool_min`` database connections (``warm_pool``); Redis
    clients connect on first use. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self, settings: Settings | None = None, *, cache_regions: CacheRegions | None = None
    ) -> None:
        self.settings = settings or Settings.from_env()
        if not self.settings.database_url:
            raise ConfigurationError(
                "DATABASE_URL is not set: pass Settings(database_url=...) or set the variable "
                "(the CLI starts embedded servers when it is missing)"
            )
        self.metrics = Metrics()
        self._outcomes = {
            name: self.metrics.transactions.labels(outcome=name)
            for name in ("commit", "rollback", "error")
        }
        self.engine: Engine = build_engine(self.settings, self.metrics)
        event.listen(self.engine, "handle_error", _translate_error)
        # One factory per (isolation, read-only) pair: the option engines carry
        # the isolation level into psycopg2's BEGIN, costing no extra round trip.
        self._factories: dict[tuple[str, bool], sessionmaker[OrmSession]] = {}
        self._redis: Redis | None = None
        self._coordination_redis: Redis | None = None
        self._lock_scripts: LockScripts | None = None
        self._rate_limiter: RateLimiter | None = None
        self._agent_state: AgentPresence | None = None
        self._session_store: SessionStore | None = None
        self.cache = Cache(
            self.settings,
            self.redis if self.settings.redis_url else None,
            regions=cache_regions,
        )
        self.metrics.registry.register(CacheCollector(self.cache.stats))
        for level in ISOLATION_LEVELS:
            for read_only in (False, True):
                options: dict[str, Any] = {"isolation_level": level}
                if read_only:
                    options["postgresql_readonly"] = True
                    options["postgresql_deferrable"] = level == "SERIALIZABLE"
                self._factories[(level, read_only)] = sessionmaker(
                    bind=self.engine.execution_options(**options),
                    class_=CapturedSession,
                    expire_on_commit=False,
                    autoflush=True,
                    info={INFO_CACHE: self.cache},
                )
        # Every write through these sessions becomes a Change: the audit trail
        # and the cache subscribe to it (see capture/change_capture.py).
        self.changes = ChangeCapture([Agent, Task, SessionModel, Achievement])
        for factory in self._factories.values():
            self.changes.install(factory)
            event.listen(factory, "after_transaction_create", self.cache.after_transaction_create)
            event.listen(factory, "after_transaction_end", self.cache.after_transaction_end)
            event.listen(factory, "do_orm_execute", self.cache.do_orm_execute)
        # Invalidation happens after the outermost COMMIT only; a rollback
        # (savepoint included) leaves nothing queued (see capture/change_capture.py).
        self.changes.on_commit(self.cache.on_commit)
        # Invalidations lost while Redis is away are logged in PostgreSQL and
        # delivered by every process (see cache/journal.py).
        self.cache.install(self.changes, self.engine)
        self.audit_trail = AuditTrail(self.changes) if self.settings.audit_enabled else None
        self.stats = StatsCache(
            redis=self.redis if self.settings.redis_url else None,
            breaker=self.cache.breaker,
            reader=partial(self.unit_of_work, read_only=True, isolation="READ COMMITTED"),
            key_prefix=self.settings.key_prefix,
            ttl=self.settings.ttls.metrics,
        )
        self.stats.install(self.changes)
        # Events on the coordination Redis; uow.events publish after the
        # commit, after the caches above were invalidated.
        self.events = Events(lambda: self.coordination_redis, prefix=self.settings.key_prefix)
        outbox = TransactionEvents(self.events)
        for factory in self._factories.values():
            outbox.install(factory)
        if self.settings.effective_coordination_redis_url:
            install_change_events(self.changes, self.events)
        self.awards = Awards()
        self._closed = False
        if self.settings.warm_pool and self.settings.pool_min > 0:
            try:
                warm_pool(self.engine, self.settings.pool_min)
            except DatabaseUnavailableError:
                # The engine's error handler has translated (and scrubbed) it.
                self.engine.dispose()
                self.cache.close()
                raise
            except sa_exc.OperationalError as err:
                self.engine.dispose()
                self.cache.close()
                raise unavailable(err) from err
        self.cache.start()

    # -- sessions and transactions -------------------------------------------

    def session_factories(self) -> list[sessionmaker[OrmSession]]:
        """Every session factory this DataLayer uses (to attach session events to)."""
        return list(self._factories.values())

    @contextmanager
    def unit_of_work(
        self,
        actor: Actor | None = None,
        isolation: str | None = None,
        read_only: bool = False,
        correlation_id: str | None = None,
    ) -> Iterator[UnitOfWork]:
        """A unit of work: one transaction at ``isolation`` (default
        SERIALIZABLE), ``READ ONLY DEFERRABLE`` when ``read_only`` at
        SERIALIZABLE. Commit with ``uow.commit()``; leaving the block
        without it rolls back. ``actor`` and ``correlation_id`` land on every
        audit row it writes; they default to the ones set with
        :func:`~orchestrator_data.acting_as` and
        :func:`~orchestrator_data.correlated` (else ``system`` and none).

        Raises :class:`DatabaseTimeoutError` when no connection becomes free
        within ``pool_timeout``.
        """
        actor = Actor.checked(actor)  # a non-Actor is a ValidationError, before any connection
        level = (isolation or self.settings.default_isolation).upper()
        factory = self._factories.get((level, bool(read_only)))
        if factory is None:
            raise ConfigurationError(f"isolation must be one of {sorted(ISOLATION_LEVELS)}")
        session = factory()
        try:
            # Check out the connection now, so a full pool or a server that is
            # down fails here, clearly (the engine's handle_error turns a
            # refused or lost connection into DatabaseUnavailableError).
            session.connection()
        except sa_exc.TimeoutError:
            session.close()
            raise _pool_timeout(self.settings) from None
        except sa_exc.DBAPIError as err:  # not translated by the engine: not expected
            session.close()
            raise unavailable(err) from None
        except BaseException:
            session.close()
            raise
        uow = UnitOfWork(
            session,
            actor=actor or current_actor(),
            isolation=level,
            read_only=read_only,
            correlation_id=correlation_id or current_correlation_id(),
        )
        outcome = "rollback"
        try:
            yield uow
            if uow.committed:
                outcome = "commit"
        except BaseException:
            outcome = "error"
            try:
                session.close()
            except DatabaseUnavailableError:
                # The connection died with the transaction, so there is nothing
                # to roll back: report the error that ended the block, not this.
                log.debug("rollback skipped: the database connection is gone")
            raise
        else:
            session.close()  # rolls back unless committed; may raise DatabaseUnavailableError
        finally:
            self._outcomes[outcome].inc()

    def run_in_transaction(
        self,
        fn: Callable[[UnitOfWork], T],
        *,
        actor: Actor | None = None,
        isolation: str | None = None,
        read_only: bool = False,
        retries: int | None = None,
        correlation_id: str | None = None,
    ) -> T:
        """Run ``fn(uow)`` in a fresh unit of work and commit. On a serialization
        failure or deadlock the *whole* function runs again in a new transaction,
        with decorrelated-jitter backoff, until ``Settings.retry_budget`` seconds
        have passed or ``retries`` retries were made (default
        ``Settings.max_retries``); then :class:`RetryExhaustedError`.
        ``fn`` must therefore have no side effects outside the transaction."""

        def attempt() -> T:
            with self.unit_of_work(
                actor=actor,
                isolation=isolation,
                read_only=read_only,
                correlation_id=correlation_id,
            ) as uow:
                result = fn(uow)
                uow.commit()
                return result

        with self.metrics.transaction_seconds.time():
            return run_with_retry(
                attempt,
                retries=self.settings.max_retries if retries is None else retries,
                budget=self.settings.retry_budget,
                backoff_base=self.settings.retry_backoff_base,
                backoff_max=self.settings.retry_backoff_max,
                metrics=self.metrics,
            )

    # -- Redis -----------------------------------------------------------------

    @property
    def redis(self) -> Redis:
        """The Redis client of the cache (``REDIS_URL``): ``cache_command_timeout``
        for connect and commands, no client retries (the cache's breaker
        decides when Redis is down). Connects on first use."""
        if self._redis is None:
            s = self.settings
            self._redis = self._make_redis(
                s.redis_url, "REDIS_URL", timeout=s.cache_command_timeout, retries=0
            )
        return self._redis

    @property
    def coordination_redis(self) -> Redis:
        """The Redis for locks, sessions and queues (``COORDINATION_REDIS_URL``,
        defaulting to ``REDIS_URL``): a client of its own, with the
        ``redis_connect_timeout`` / ``redis_command_timeout`` and
        ``redis_max_retries`` of the settings. Connects on first use."""
        if self._coordination_redis is None:
            s = self.settings
            self._coordination_redis = self._make_redis(
                s.effective_coordination_redis_url,
                "COORDINATION_REDIS_URL or REDIS_URL",
                timeout=s.redis_command_timeout,
                connect_timeout=s.redis_connect_timeout,
                retries=s.redis_max_retries,
            )
        return self._coordination_redis

    def key(self, name: str) -> str:
        """``name`` under this DataLayer's key prefix."""
        return self.settings.key_prefix + name

    def _make_redis(
        self,
        url: str | None,
        env_name: str,
        *,
        timeout: float,
        retries: int,
        connect_timeout: float | None = None,
    ) -> Redis:
        if not url:
            raise ConfigurationError(f"{env_name} is not set")
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries) if retries else None
        return redis_lib.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout or timeout,
            socket_timeout=timeout,
            retry=retry or Retry(NoBackoff(), 0),
            retry_on_error=[redis_lib.ConnectionError, redis_lib.TimeoutError] if retries else [],
            health_check_interval=30,
        )

    # -- coordination ------------------------------------------------------------

    def lock(
        self,
        name: str,
        ttl: float | None = None,
        blocking_timeout: float | None = None,
        auto_renew: bool = False,
        on_lost: Callable[[Lock], object] | None = None,
    ) -> Lock:
        """A distributed lock on the coordination Redis (see
        :mod:`orchestrator_data.coordination.locks`): ``with dl.lock(name) as
        lock: ...``, or ``lock.acquire()`` / ``lock.release()``. ``ttl``
        defaults to ``ttls.lock`` (30 s); ``blocking_timeout`` None waits
        forever; ``lock.fence`` is its fencing token, for ``uow.fence(lock)``."""
        if self._lock_scripts is None:
            self._lock_scripts = LockScripts(self.coordination_redis)
        return Lock(
            self._lock_scripts,
            name,
            prefix=self.settings.key_prefix,
            ttl=self.settings.ttls.lock if ttl is None else ttl,
            blocking_timeout=blocking_timeout,
            auto_renew=auto_renew,
            on_lost=on_lost,
        )

    @property
    def rate_limiter(self) -> RateLimiter:
        """Sliding-window rate limits on the coordination Redis (see
        :mod:`orchestrator_data.coordination.rate_limit`); named limits come
        from ``Settings.rate_limits``."""
        if self._rate_limiter is None:
            self._rate_limiter = RateLimiter(
                self.coordination_redis,
                prefix=self.settings.key_prefix,
                named=self.settings.rate_limits,
                default_window=float(self.settings.ttls.rate_limit),
            )
        return self._rate_limiter

    @property
    def agent_state(self) -> AgentPresence:
        """Agent presence on the coordination Redis (see
        :mod:`orchestrator_data.coordination.presence`); a changed status is
        written to the ``agents`` table in a unit of work acting as the agent."""
        if self._agent_state is None:

            def write_status(agent_id: uuid.UUID, status: str) -> None:
                self.run_in_transaction(
                    lambda uow: uow.agents.update(agent_id, status=status),
                    actor=Actor("agent", str(agent_id)),
                )

            self._agent_state = AgentPresence(
                self.coordination_redis,
                prefix=self.settings.key_prefix,
                ttl=self.settings.ttls.agent_state,
                write_status=write_status,
            )
        return self._agent_state

    @property
    def session_store(self) -> SessionStore:
        """The session store on the coordination Redis (see
        :mod:`orchestrator_data.coordination.sessions`): idle TTL
        ``ttls.session``, durable copy in the ``sessions`` table."""
        if self._session_store is None:
            self._session_store = SessionStore(
                self.coordination_redis,
                run=self.run_in_transaction,
                prefix=self.settings.key_prefix,
                ttl=self.settings.ttls.session,
            )
        return self._session_store

    # -- migrations ----------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config

        if not (_ALEMBIC_DIR / "env.py").exists():
            raise ConfigurationError(f"alembic scripts not found at {_ALEMBIC_DIR}")
        cfg = Config()
        cfg.set_main_option("script_location", str(_ALEMBIC_DIR))
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
        return cfg

    def migrate(self, revision: str = "head") -> None:
        """Upgrade the database schema to ``revision`` (alembic).

        Raises :class:`MigrationError` for a revision alembic cannot reach,
        :class:`DatabaseUnavailableError` / :class:`DatabaseTimeoutError`
        when no connection can be had."""
        from alembic import command

        cfg = self._alembic_config()
        with self._migration_errors("upgrade", revision), self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def downgrade(self, revision: str) -> None:
        """Downgrade the database schema to ``revision`` (``base`` removes it all).

        Raises :class:`MigrationError` for a revision alembic cannot reach
        (``-1`` at base among them), :class:`DatabaseUnavailableError` /
        :class:`DatabaseTimeoutError` when no connection can be had."""
        from alembic import command

        cfg = self._alembic_config()
        with self._migration_errors("downgrade", revision), self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)

    def current_revision(self) -> str | None:
        """The schema revision the database is at (``None`` if unmigrated).

        Raises :class:`DatabaseUnavailableError` / :class:`DatabaseTimeoutError`
        when no connection can be had."""
        from alembic.runtime.migration import MigrationContext

        with self._migration_errors("read the revision of", None), self.engine.connect() as conn:
            rev: str | None = MigrationContext.configure(conn).get_current_revision()
            return rev

    @contextmanager
    def _migration_errors(self, action: str, revision: str | None) -> Iterator[None]:
        # alembic's refusals and the pool's timeout as package errors; refused
        # or lost connections are already DatabaseUnavailableError (handle_error).
        from alembic.util.exc import CommandError

        try:
            yield
        except CommandError as err:
            message = f"cannot {action} to revision {revision!r}: {err}"
            if action == "downgrade" and self.current_revision() is None:
                message = (
                    f"cannot downgrade to revision {revision!r}: the database is at base "
                    "(no migration applied), so there is nothing to roll back"
                )
            raise MigrationError(message) from None
        except sa_exc.TimeoutError:
            raise _pool_timeout(self.settings) from None

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the pool and the Redis clients. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.events.close()
        self.cache.close()
        self.engine.dispose()
        for client in (self._redis, self._coordination_redis):
            if client is not None:
                client.close()

    def __enter__(self) -> DataLayer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DataLayer {self.settings!r}>"


def unavailable(err: BaseException, *, lost: bool = False) -> DatabaseUnavailableError:
    """The error for a refused connection attempt, or (``lost``) a connection
    that died in use: libpq's first line (which names host and port, never the
    password)."""
    lines = str(getattr(err, "orig", err)).strip().splitlines()
    reason = lines[0] if lines else type(err).__name__
    if lost:
        return DatabaseUnavailableError(
            f"lost the connection to PostgreSQL: {reason} (the open transaction is gone; "
            "if this was its COMMIT, whether it committed is unknown; "
            "the pool reconnects once the server is back)"
        )
    return DatabaseUnavailableError(f"cannot connect to PostgreSQL: {reason}")


def _pool_timeout(settings: Settings) -> DatabaseTimeoutError:
    return DatabaseTimeoutError(
        f"no database connection became free within {settings.pool_timeout:g} s "
        f"(pool_max={settings.pool_max}); raise pool_max or pool_timeout, "
        "or hold units of work for less time"
    )


def _translate_error(context: Any) -> BaseException | None:
    # The one place driver errors become package errors (by SQLSTATE). First
    # the driver error and SQLAlchemy's wrapper lose every text that may quote
    # a parameter value: whatever is raised from here chains to them.
    original = context.original_exception
    driver_errors.scrub(original, context.sqlalchemy_exception, statement=context.statement)
    if getattr(context, "is_pre_ping", False):
        return None  # the pool's own pre-ping must see the driver error
    in_use = context.connection is not None
    if driver_errors.is_unavailable(original) and in_use:
        # libpq's own failure on a connection in use (no SQLSTATE): it is
        # broken even when SQLAlchemy's list of messages does not say so.
        context.is_disconnect = True
    if context.is_disconnect or driver_errors.is_unavailable(original):
        # SQLAlchemy still invalidates the connection, and the pool: every
        # connection opened before is replaced on its next checkout, so the
        # pool recovers by itself once the server is back.
        return unavailable(original, lost=in_use)
    return driver_errors.translate(original)
