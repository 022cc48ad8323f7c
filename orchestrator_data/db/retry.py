"""Whole-transaction retry on serialization failure (40001) and deadlock (40P01)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from orchestrator_data.db.driver_errors import is_retryable
from orchestrator_data.errors import RetryExhaustedError, sqlstate_of
from orchestrator_data.metrics import Metrics

T = TypeVar("T")


def run_with_retry(
    attempt: Callable[[], T],
    *,
    retries: int,
    backoff_base: float,
    backoff_max: float,
    metrics: Metrics,
) -> T:
    """Call ``attempt()`` until it returns, re-running it on serialization
    failures and deadlocks only, at most ``retries`` more times, sleeping a
    random ("full jitter") exponential backoff between tries. Any other error
    propagates at once. After the last try: :class:`RetryExhaustedError`."""

    def count(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        metrics.transaction_retries.labels(sqlstate=sqlstate_of(error) or "unknown").inc()

    retrying = Retrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_random_exponential(multiplier=backoff_base, max=backoff_max),
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
        raise RetryExhaustedError(retries + 1, last) from last
