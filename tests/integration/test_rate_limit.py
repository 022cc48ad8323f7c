"""Sliding-window rate limits against a real Redis: exact under concurrency,
sliding, refusals not counted, the server's clock rather than the client's."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from fixtures.concurrency import run_threads
from orchestrator_data import DataLayer, RateLimitedError, ValidationError


def key() -> str:
    return f"rl-{uuid.uuid4().hex[:8]}"


def test_twenty_threads_get_exactly_the_limit(data_layer: DataLayer) -> None:
    name = key()
    allowed: list[bool] = []

    def fire(_: int) -> None:
        for _ in range(25):
            allowed.append(data_layer.rate_limiter.hit(name, limit=100, window=60).allowed)

    assert run_threads(20, fire) == []
    assert len(allowed) == 500
    assert sum(allowed) == 100


def test_the_window_slides_and_refusals_do_not_count(data_layer: DataLayer) -> None:
    name, limiter = key(), data_layer.rate_limiter
    results = [limiter.hit(name, limit=5, window=0.6) for _ in range(5)]
    assert [r.allowed for r in results] == [True] * 5
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0]
    time.sleep(0.3)
    for _ in range(20):  # refused, and not counted against the window
        refused = limiter.hit(name, limit=5, window=0.6)
        assert not refused.allowed and refused.remaining == 0
        assert 0 < refused.retry_after <= 0.31
    time.sleep(refused.retry_after + 0.02)
    # The first five left the window; twenty refusals never entered it.
    again = [limiter.hit(name, limit=5, window=0.6).allowed for _ in range(6)]
    assert again == [True] * 5 + [False]


def test_a_client_clock_an_hour_off_changes_nothing(
    data_layer: DataLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, limiter = key(), data_layer.rate_limiter
    assert limiter.hit(name, limit=2, window=30).allowed
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    second = limiter.hit(name, limit=2, window=30)
    third = limiter.hit(name, limit=2, window=30)
    assert second.allowed and second.remaining == 0
    assert not third.allowed and 29 < third.retry_after <= 30


def test_cost_named_limits_and_check_or_raise(
    make_data_layer: Callable[..., DataLayer],
) -> None:
    dl = make_data_layer(rate_limits={"login": (3, 60)}, warm_pool=False)
    user = key()
    assert dl.rate_limiter.hit("login", user).remaining == 2
    assert dl.rate_limiter.hit("login", user, cost=2).remaining == 0
    with pytest.raises(RateLimitedError) as refused:
        dl.rate_limiter.check_or_raise("login", user)
    assert 59 < refused.value.retry_after <= 60
    assert dl.rate_limiter.hit("login", key()).allowed  # per subject
    with pytest.raises(ValidationError, match="No rate limit named"):
        dl.rate_limiter.hit("nope", user)
    with pytest.raises(ValidationError, match="cost"):
        dl.rate_limiter.hit(key(), limit=5, cost=6)
    with pytest.raises(ValidationError, match="key"):
        dl.rate_limiter.hit("a{b}", limit=5)
    with pytest.raises(ValidationError, match="window"):
        dl.rate_limiter.hit(key(), limit=5, window=0)
