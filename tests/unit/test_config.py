from __future__ import annotations

import pytest

from orchestrator_data import ConfigurationError, Settings
from orchestrator_data.config import redact_url, sqlalchemy_url


def test_defaults_are_the_design_values() -> None:
    s = Settings()
    assert (s.pool_min, s.pool_max) == (5, 20)
    assert s.pool_timeout == 2.0
    assert s.pool_idle_timeout == 30.0
    assert s.statement_timeout == 30.0
    assert s.slow_query_threshold == 1.0
    assert s.redis_max_retries == 3
    assert s.redis_connect_timeout == 10.0
    assert s.redis_command_timeout == 5.0
    assert s.default_isolation == "SERIALIZABLE"
    t = s.ttls
    assert (t.session, t.agent_state, t.query, t.task_result) == (3600, 300, 600, 86400)
    assert (t.rate_limit, t.lock, t.metrics) == (60, 30, 3600)


def test_from_env_reads_urls_and_overrides() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:pw@db/x",
            "REDIS_URL": "redis://cache:6379/0",
            "ORCHESTRATOR_POOL_MAX": "40",
            "ORCHESTRATOR_STATEMENT_TIMEOUT": "2.5",
            "ORCHESTRATOR_POOL_PRE_PING": "false",
            "ORCHESTRATOR_TTL_SESSION": "1800",
            "UNRELATED": "x",
        }
    )
    assert s.database_url == "postgresql://u:pw@db/x"
    assert s.pool_max == 40
    assert s.statement_timeout == 2.5
    assert s.pool_pre_ping is False
    assert s.ttls.session == 1800
    assert s.ttls.query == 600
    # COORDINATION_REDIS_URL defaults to REDIS_URL
    assert s.effective_coordination_redis_url == "redis://cache:6379/0"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"ORCHESTRATOR_POOL_MAXX": "1"}, "ORCHESTRATOR_POOL_MAXX"),
        ({"ORCHESTRATOR_POOL_MAX": "many"}, "ORCHESTRATOR_POOL_MAX"),
        ({"ORCHESTRATOR_WARM_POOL": "perhaps"}, "ORCHESTRATOR_WARM_POOL"),
    ],
)
def test_bad_environment_is_a_clear_error(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pool_min": 10, "pool_max": 5}, "pool_max"),
        ({"statement_timeout": 0}, "statement_timeout"),
        ({"default_isolation": "CHAOS"}, "default_isolation"),
        ({"database_url": "mysql://x/y"}, "database_url"),
        ({"redis_url": "http://x"}, "redis_url"),
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_repr_never_shows_passwords() -> None:
    s = Settings(
        database_url="postgresql://admin:s3cret-pw@db:5432/app",
        redis_url="redis://:r3dis-pw@cache:6379/0",
    )
    text = repr(s)
    assert "s3cret-pw" not in text
    assert "r3dis-pw" not in text
    assert "admin" in text


def test_url_helpers() -> None:
    assert sqlalchemy_url("postgresql://u@h/db").startswith("postgresql+psycopg2://")
    assert "pw" not in redact_url("postgresql://u:pw@h/db")
