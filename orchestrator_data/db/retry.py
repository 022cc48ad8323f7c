"""Whole-transaction retry on serialization failure (40001) and deadlock (40P01).

Why a budget of time and decorrelated jitter: under contention on one row,
each round of conflicting transactions lets one of them commit, so the
unluckiest of N contenders needs about N attempts. A fixed count of retries
fails as soon as more callers contend than the count allows (10 retries of
32 threads failed a fifth of them), while a budget of elapsed time bounds
what the caller cares about, its latency, whatever the number of
contenders. Decorrelated jitter (each sleep drawn between the base and three
times the previous sleep, capped) spreads the retries of contenders that
collided once, where plain exponential backoff keeps them in step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from orchestrator_data.db.driver_errors import is_retryable
from orchestrator_data.errors import RetryExhaustedError, sqlstate_of
from orchestrator_data.metrics import Metrics

T = TypeVar("T")


class DecorrelatedJitter:
    """Sleeps of "decorrelated jitter": ``min(cap, uniform(base, 3 * previous))``,
    starting from ``base``. One instance per call that retries (it keeps the
    previous sleep)."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        self._previous = base

    def __call__(self, retry_state: RetryCallState) -> float:
        sleep = min(self.cap, random.uniform(self.base, self._previous * 3))
        self._previous = sleep
        return sleep


def run_with_retry(
    attempt: Callable[[], T],
    *,
    retries: int,
    budget: float,
    backoff_base: float,
    backoff_max: float,
    metrics: Metrics,
) -> T:
    """Call ``attempt()`` until it returns, re-running it on serialization
    failures and deadlocks only, sleeping a decorrelated-jitter backoff
    between tries (``backoff_base`` .. ``backoff_max``). No new try starts
    once ``budget`` seconds have passed since the first one, nor after
    ``retries`` retries; then :class:`RetryExhaustedError`. Any other error
    propagates at once."""

    def count(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        metrics.transaction_retries.labels(sqlstate=sqlstate_of(error) or "unknown").inc()

    retrying = Retrying(
        stop=stop_after_attempt(retries + 1) | stop_after_delay(budget),
        wait=DecorrelatedJitter(backoff_base, backoff_max),
        retry=retry_if_exception(is_retryable),
        before_sleep=count,
        reraise=False,
    )
    try:
        return retrying(attempt)
    except RetryError as err:
        metrics.retries_exhausted.inc()
        last = err.last_attempt.exception()
        assert last is not None
        raise RetryExhaustedError(err.last_attempt.attempt_number, last) from last
