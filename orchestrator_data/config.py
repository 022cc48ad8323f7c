"""Settings: every knob of the data layer, with the design document's defaults.

Settings are a frozen dataclass built explicitly or by :meth:`Settings.from_env`.
Nothing here connects or reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from orchestrator_data.errors import ConfigurationError

ISOLATION_LEVELS = frozenset({"SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED"})


@dataclass(frozen=True)
class CacheTTLs:
    """Time-to-live in seconds of each kind of Redis key (the design's TTL table)."""

    session: int = 3600
    agent_state: int = 300
    query: int = 600
    task_result: int = 86400
    rate_limit: int = 60
    lock: int = 30
    metrics: int = 3600


@dataclass(frozen=True)
class Settings:
    """Configuration of a :class:`~orchestrator_data.DataLayer`.

    ``database_url`` / ``redis_url`` of ``None`` mean "start the embedded
    servers" (only the CLI and the test-suite do that; a DataLayer needs URLs).
    """

    database_url: str | None = None
    redis_url: str | None = None
    coordination_redis_url: str | None = None  # defaults to redis_url
    # PostgreSQL pool (design: min 5, max 20, 2 s connection timeout, 30 s idle).
    pool_min: int = 5
    pool_max: int = 20
    pool_timeout: float = 2.0
    connect_timeout: float = 2.0
    pool_idle_timeout: float = 30.0
    pool_pre_ping: bool = True
    pool_ping_after: float = 1.0  # ping only connections idle longer than this
    warm_pool: bool = True
    statement_timeout: float = 30.0
    slow_query_threshold: float = 1.0
    application_name: str = "orchestrator_data"
    sslmode: str | None = None
    sslrootcert: str | None = None
    # Transactions.
    default_isolation: str = "SERIALIZABLE"
    # Whole-transaction retry (run_in_transaction): a budget of elapsed time
    # first, a count as a backstop, decorrelated jitter between tries; see
    # orchestrator_data/db/retry.py for why.
    max_retries: int = 100
    retry_budget: float = 30.0
    retry_backoff_base: float = 0.005
    retry_backoff_max: float = 1.0
    # Redis (design: retries 3, connect 10 s, command 5 s).
    redis_max_retries: int = 3
    redis_connect_timeout: float = 10.0
    redis_command_timeout: float = 5.0
    key_prefix: str = ""
    # Audit trail: one audit_logs row per change, in the same transaction.
    audit_enabled: bool = True
    # Caching.
    cache_enabled: bool = True
    l1_max_entries: int = 10_000
    l1_ttl: float = 60.0  # capped per kind by the L2 TTL of the TTL table
    ttls: CacheTTLs = field(default_factory=CacheTTLs)
    # While Redis is down the breaker skips it; it probes every interval
    # (a PING with this timeout) and a call in flight longer than
    # cache_slow_call opens it, so callers never queue behind command timeouts.
    cache_probe_interval: float = 1.0
    cache_probe_timeout: float = 0.25
    cache_slow_call: float = 0.5
    # The cache's own client (reads, fills, invalidations, stats): this
    # connect and command timeout, and no client retries, since the breaker
    # decides what "down" means. The coordination client keeps the
    # redis_* timeouts and retries above.
    cache_command_timeout: float = 0.25
    # Named rate limits: name -> (limit, window seconds), for
    # dl.rate_limiter.hit(name, subject). From the environment as
    # ORCHESTRATOR_RATE_LIMITS="api=100/60,login=5/300".
    rate_limits: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    # L2 fills sent but not yet acknowledged by Redis; beyond this they are dropped.
    cache_fill_queue: int = 10_000
    # Embedded servers (CLI / tests only).
    data_dir: str = ".orchestrator_data"

    def __post_init__(self) -> None:
        problems: dict[str, str] = {}
        if self.pool_min < 0:
            problems["pool_min"] = "must be >= 0"
        if self.pool_max < 1 or self.pool_max < self.pool_min:
            problems["pool_max"] = "must be >= 1 and >= pool_min"
        for name in (
            "pool_timeout",
            "connect_timeout",
            "pool_idle_timeout",
            "pool_ping_after",
            "statement_timeout",
            "slow_query_threshold",
            "redis_connect_timeout",
            "redis_command_timeout",
            "l1_ttl",
            "cache_probe_interval",
            "cache_probe_timeout",
            "cache_slow_call",
            "cache_command_timeout",
            "retry_budget",
            "retry_backoff_base",
            "retry_backoff_max",
        ):
            if getattr(self, name) <= 0:
                problems[name] = "must be > 0"
        if self.max_retries < 1:
            problems["max_retries"] = "must be >= 1"
        if self.redis_max_retries < 0:
            problems["redis_max_retries"] = "must be >= 0"
        if self.l1_max_entries < 1:
            problems["l1_max_entries"] = "must be >= 1"
        if self.cache_fill_queue < 1:
            problems["cache_fill_queue"] = "must be >= 1"
        if not _valid_rate_limits(self.rate_limits):
            problems["rate_limits"] = (
                "must map names to (limit, window): a positive whole number and positive seconds"
            )
        if self.default_isolation.upper() not in ISOLATION_LEVELS:
            problems["default_isolation"] = f"must be one of {sorted(ISOLATION_LEVELS)}"
        for name in ("database_url", "redis_url", "coordination_redis_url"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                problems[name] = "must be a string"
        if isinstance(self.database_url, str) and self.database_url:
            try:
                url = make_url(self.database_url)
            except (ArgumentError, ValueError):  # ValueError: a bad port or IPv6 bracket
                problems["database_url"] = "is not a valid database URL"
            else:
                if not url.drivername.startswith("postgresql"):
                    problems["database_url"] = "must be a postgresql:// URL"
        for name in ("redis_url", "coordination_redis_url"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                continue
            if not value.startswith(("redis://", "rediss://", "unix://")):
                problems[name] = "must start with redis://, rediss:// or unix://"
            elif not _parses_as_redis_url(value):
                problems[name] = "is not a valid Redis URL"
        if problems:
            detail = "; ".join(f"{k} {v}" for k, v in sorted(problems.items()))
            raise ConfigurationError(f"invalid settings: {detail}")

    @property
    def effective_coordination_redis_url(self) -> str | None:
        """The Redis used for locks, sessions, queues: its own URL, else ``redis_url``."""
        return self.coordination_redis_url or self.redis_url

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def __repr__(self) -> str:
        # Never show credentials: URLs are rendered with the password masked.
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_url") and value:
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``DATABASE_URL``, ``REDIS_URL``, ``COORDINATION_REDIS_URL``
        and ``ORCHESTRATOR_<FIELD>`` overrides (e.g. ``ORCHESTRATOR_POOL_MAX=40``,
        ``ORCHESTRATOR_TTL_SESSION=1800``). Unknown ``ORCHESTRATOR_*`` names are an error.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        ttl_values: dict[str, Any] = {}
        for key, env_name in (
            ("database_url", "DATABASE_URL"),
            ("redis_url", "REDIS_URL"),
            ("coordination_redis_url", "COORDINATION_REDIS_URL"),
        ):
            if env.get(env_name):
                values[key] = env[env_name]
        simple = {f.name: f for f in fields(cls) if f.name not in ("ttls", "rate_limits")}
        ttl_fields = {f.name: f for f in fields(CacheTTLs)}
        for env_name, raw in env.items():
            if not env_name.startswith("ORCHESTRATOR_") or env_name in NOT_SETTINGS:
                continue
            name = env_name[len("ORCHESTRATOR_") :].lower()
            if name.startswith("ttl_") and name[4:] in ttl_fields:
                ttl_values[name[4:]] = _coerce(env_name, raw, int)
            elif name == "rate_limits":
                values[name] = _parse_rate_limits(env_name, raw)
            elif name in simple:
                default = simple[name].default
                kind: type = type(default) if default is not None else str
                values[name] = _coerce(env_name, raw, kind)
            else:
                raise ConfigurationError(f"unknown setting {env_name}")
        if ttl_values:
            values["ttls"] = CacheTTLs(**ttl_values)
        return cls(**values)


def _valid_rate_limits(value: object) -> bool:
    if not isinstance(value, Mapping):
        return False
    for name, pair in value.items():
        if not isinstance(name, str) or not name or not isinstance(pair, (tuple, list)):
            return False
        if len(pair) != 2:
            return False
        limit, window = pair
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            return False
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0:
            return False
    return True


def _parse_rate_limits(env_name: str, raw: str) -> dict[str, tuple[int, float]]:
    """``"api=100/60,login=5/300"`` as ``{"api": (100, 60.0), "login": (5, 300.0)}``."""
    limits: dict[str, tuple[int, float]] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        name, _, spec = part.partition("=")
        limit, _, window = spec.partition("/")
        try:
            limits[name.strip()] = (int(limit), float(window))
        except ValueError:
            raise ConfigurationError(
                f"{env_name} must be name=limit/seconds pairs separated by commas "
                "(e.g. api=100/60,login=5/300)"
            ) from None
    return limits


#: ``ORCHESTRATOR_*`` variables read elsewhere, not Settings fields.
NOT_SETTINGS = frozenset({"ORCHESTRATOR_EMBEDDED_PG"})  # orchestrator_data.embedded


def _coerce(env_name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigurationError(f"{env_name} must be a boolean (true/false)")
    try:
        return kind(raw)
    except ValueError:
        expected = _EXPECTED.get(kind, f"of type {kind.__name__}")
        raise ConfigurationError(f"{env_name} must be {expected}") from None


#: How a setting's expected type is named in an error (never quoting the value,
#: which may be a secret).
_EXPECTED: dict[type, str] = {
    int: "a whole number (e.g. 20)",
    float: "a number of seconds or a ratio (e.g. 2.5)",
}


def sqlalchemy_url(url: str) -> str:
    """``url`` with the psycopg2 driver made explicit: SQLAlchemy 2.1 maps a
    bare ``postgresql://`` to psycopg 3, which this package does not depend on."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


def _parses_as_redis_url(url: str) -> bool:
    # What redis-py's from_url reads: urllib's split, port and host.
    try:
        parts = urlsplit(url)
        _ = parts.port, parts.hostname
    except ValueError:
        return False
    return True


#: Query parameters that carry secrets: libpq's ``password`` and
#: ``sslpassword``, redis-py's ``password``.
SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


def redact_url(url: str) -> str:
    """Render a database or Redis URL with any password replaced by ``***``:
    the one in the user-info part (``user:pw@``) and ``?password=`` /
    ``?sslpassword=`` query parameters, for every scheme (``unix://`` too).
    Nothing else is re-encoded."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    query = "&".join(_redact_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_pair(pair: str) -> str:
    key, eq, _ = pair.partition("=")
    return f"{key}=***" if eq and unquote_plus(key).lower() in SECRET_QUERY_KEYS else pair
