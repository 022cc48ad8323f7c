"""Building the SQLAlchemy engine: pool sizing, timeouts, TLS, slow-query log."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, create_engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

from orchestrator_data.config import SECRET_QUERY_KEYS, Settings, sqlalchemy_url
from orchestrator_data.errors import ConfigurationError
from orchestrator_data.metrics import Metrics

slow_log = logging.getLogger("orchestrator_data.slow_query")

_CHECKIN_AT = "orchestrator_data_checkin_at"


def build_engine(settings: Settings, metrics: Metrics | None = None) -> Engine:
    """An engine with the design's pool (``pool_min``..``pool_max`` connections,
    ``pool_timeout`` to wait for one), server-side ``statement_timeout``, TLS
    options passed through, idle connections replaced, and the slow-query log.
    Creating it does not connect; :func:`warm_pool` does."""
    if not settings.database_url:
        raise ConfigurationError("database_url is not set (DATABASE_URL)")
    url, secrets = _without_query_secrets(make_url(sqlalchemy_url(settings.database_url)))
    options = f"-c statement_timeout={int(settings.statement_timeout * 1000)}"
    connect_args: dict[str, Any] = {
        # libpq takes whole seconds and treats values below 2 as 2.
        "connect_timeout": max(2, round(settings.connect_timeout)),
        "application_name": settings.application_name,
        "options": options,
        **secrets,
    }
    if settings.sslmode:
        connect_args["sslmode"] = settings.sslmode
    if settings.sslrootcert:
        connect_args["sslrootcert"] = settings.sslrootcert
    engine = create_engine(
        url,
        poolclass=QueuePool,
        pool_size=settings.pool_min if settings.pool_min > 0 else 1,
        max_overflow=settings.pool_max - max(settings.pool_min, 1),
        pool_timeout=settings.pool_timeout,
        pool_pre_ping=False,  # done by _install_pool_hygiene, only after idleness
        pool_use_lifo=True,
        connect_args=connect_args,
        # Parameter values never reach logs or exception messages.
        hide_parameters=True,
    )
    _install_pool_hygiene(
        engine, settings.pool_idle_timeout, settings.pool_pre_ping, settings.pool_ping_after
    )
    _install_slow_query_log(engine, settings.slow_query_threshold, metrics)
    return engine


def _without_query_secrets(url: URL) -> tuple[URL, dict[str, str]]:
    # A ?password= (or ?sslpassword=) in DATABASE_URL would show in the
    # engine's repr, which masks only the user-info password: the password
    # becomes the URL's own (masked), the rest goes to connect_args.
    secrets: dict[str, str] = {}
    for key in SECRET_QUERY_KEYS & set(url.query):
        value = url.query[key]
        secrets[key] = value if isinstance(value, str) else value[-1]
    if not secrets:
        return url, {}
    url = url.difference_update_query(secrets)
    if "password" in secrets:
        url = url.set(password=secrets.pop("password"))
    return url, secrets


def warm_pool(engine: Engine, count: int) -> None:
    """Open ``count`` connections now, so the first requests do not pay for it."""
    conns = []
    try:
        for _ in range(count):
            conns.append(engine.connect())
    finally:
        for conn in conns:
            conn.close()


def _install_pool_hygiene(
    engine: Engine, idle_timeout: float, pre_ping: bool, ping_after: float
) -> None:
    # QueuePool has no idle timeout of its own: a connection that sat in the
    # pool longer than idle_timeout (the design's 30 s) is replaced on its next
    # checkout. A connection idle for more than ping_after is pinged first
    # (SQLAlchemy's pool_pre_ping would pay that round trip on every
    # checkout; one used a moment ago is alive, and if the server died since,
    # the error marks the whole pool invalid anyway). Raising
    # DisconnectionError makes the pool discard it and connect anew.
    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info[_CHECKIN_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        checked_in = record.info.get(_CHECKIN_AT)
        if checked_in is None:
            return  # fresh connection
        idle = time.monotonic() - checked_in
        if idle > idle_timeout:
            record.info.pop(_CHECKIN_AT, None)
            raise DisconnectionError("connection idle longer than pool_idle_timeout")
        if pre_ping and idle > ping_after:
            try:
                cursor = dbapi_conn.cursor()
                try:
                    cursor.execute("SELECT 1")
                finally:
                    cursor.close()
                dbapi_conn.rollback()
            except Exception as err:  # any failure means the connection is unusable
                record.info.pop(_CHECKIN_AT, None)
                raise DisconnectionError("connection failed its pre-ping") from err


def _install_slow_query_log(engine: Engine, threshold: float, metrics: Metrics | None) -> None:
    # The start time rides on the execution context: cheaper than a stack in
    # conn.info, and nothing to clean up when a statement fails.
    @event.listens_for(engine, "before_cursor_execute")
    def _before(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
    ) -> None:
        if context is not None:
            context._od_started = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def _after(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
    ) -> None:
        started = getattr(context, "_od_started", None)
        if started is None:
            return
        elapsed = time.perf_counter() - started
        if elapsed >= threshold:
            if metrics is not None:
                metrics.slow_queries.inc()
            # The statement text carries placeholders only; values are redacted.
            slow_log.warning(
                "slow query: %.3f s: %s [parameters redacted]",
                elapsed,
                " ".join(_loggable(statement, context).split()),
            )


def _loggable(statement: str, context: Any) -> str:
    # psycopg2 fills the parameters in after this point, so ``statement`` has
    # placeholders; only SQLAlchemy's literal_execute parameters are rendered
    # into it, and then the compiled form (with their placeholders) is logged.
    compiled = getattr(context, "compiled", None)
    if compiled is not None and getattr(compiled, "literal_execute_params", None):
        return str(compiled.string)
    return statement
