"""Settings at their edges: passwords in every place a URL can carry one stay
out of reprs, a malformed URL is a ConfigurationError that does not quote
it, and an absurd prune duration is a clear refusal. No server needed."""

from __future__ import annotations

import pytest

from orchestrator_data import ConfigurationError, Settings, ValidationError
from orchestrator_data.config import redact_url
from orchestrator_data.db.engine import build_engine
from orchestrator_data.durations import parse_duration

SECRET = "Sup3r-S3cret-pw"
PG = "postgresql://app@db.example:5432/orchestrator"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"{PG}?password={SECRET}", f"{PG}?password=***"),
        (f"{PG}?sslmode=require&PassWord={SECRET}", f"{PG}?sslmode=require&PassWord=***"),
        (
            f"{PG}?sslpassword={SECRET}&sslmode=verify-full",
            f"{PG}?sslpassword=***&sslmode=verify-full",
        ),
        (
            f"postgresql://app:{SECRET}@db.example/orchestrator",
            "postgresql://app:***@db.example/orchestrator",
        ),
        (f"redis://:{SECRET}@cache.example:6379/0", "redis://:***@cache.example:6379/0"),
        (f"rediss://user:{SECRET}@cache.example:6380/1", "rediss://user:***@cache.example:6380/1"),
        (f"unix://:{SECRET}@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        (
            f"unix:///run/redis.sock?db=2&password={SECRET}",
            "unix:/run/redis.sock?db=2&password=***",
        ),
        ("redis://cache.example:6379/0", "redis://cache.example:6379/0"),
        ("postgresql:///db?host=/run/pg%2Fsock", "postgresql:/db?host=/run/pg%2Fsock"),
    ],
)
def test_redact_url_masks_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_settings_repr_masks_query_and_unix_socket_passwords() -> None:
    settings = Settings(
        database_url=f"{PG}?password={SECRET}",
        redis_url=f"unix://:{SECRET}@/run/redis.sock?db=0",
        coordination_redis_url=f"unix:///run/redis.sock?db=1&password={SECRET}",
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert "password=***" in repr(settings)


def test_engine_repr_masks_a_query_password_and_still_passes_it() -> None:
    # Building the engine does not connect.
    engine = build_engine(Settings(database_url=f"{PG}?password={SECRET}&sslmode=disable"))
    try:
        assert SECRET not in repr(engine)
        assert SECRET not in repr(engine.url)
        assert engine.url.password == SECRET  # moved from the query to its own (masked) place
        assert engine.url.query == {"sslmode": "disable"}
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("database_url", f"postgresql://app:{SECRET}@[::1:5432/db"),
        ("database_url", f"postgresql://app:{SECRET}@db.example:port/db"),
        ("database_url", "postgresql://[::1:5432"),
        ("redis_url", f"redis://:{SECRET}@[::1:6379/0"),
        ("redis_url", f"redis://:{SECRET}@cache.example:99999/0"),
        ("coordination_redis_url", f"redis://:{SECRET}@cache.example:x/0"),
    ],
)
def test_a_malformed_url_is_a_configuration_error_naming_the_setting(field: str, url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(database_url=PG).with_overrides(**{field: url})
    assert field in str(info.value)
    assert SECRET not in str(info.value)
    assert url not in str(info.value)
    assert info.value.__cause__ is None


def test_a_malformed_url_from_the_environment_too() -> None:
    with pytest.raises(ConfigurationError, match="database_url") as info:
        Settings.from_env({"DATABASE_URL": f"postgresql://app:{SECRET}@[::1:5432"})
    assert SECRET not in str(info.value)


def test_an_unparseable_url_is_never_echoed() -> None:
    assert redact_url(f"postgresql://app:{SECRET}@[::1:5432") == "<unparseable url>"


def test_prune_duration_beyond_timedelta_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        parse_duration("99999999999d")
    assert info.value.fields == ["older_than"]
    assert "too long" in str(info.value)
    assert info.value.__cause__ is None
