"""Circuit breaker in front of Redis.

Closed: calls go through. The first call that fails (after the client's own
retries) or one that has been in flight longer than ``slow_call`` opens it.
Open: calls are skipped at once, so a dead or hung Redis costs readers
nothing and they never queue behind 5 s command timeouts. While open, a
background thread runs ``probe`` (a PING with a short timeout) every
``probe_interval`` and then ``on_recover`` (which may repair what was missed
while Redis was away); when both succeed the breaker closes by itself, with
or without traffic. Without a ``probe``, the first call after the interval
is the probe (half-open).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from redis.exceptions import RedisError

log = logging.getLogger("orchestrator_data.cache")

T = TypeVar("T")

#: Errors that mean "Redis is unavailable", as opposed to a bug of ours.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

CLOSED = "closed"
OPEN = "open"


class Unavailable(Exception):
    """Raised by :meth:`CircuitBreaker.execute` when Redis may not be used."""


class CircuitBreaker:
    """Guards calls to one Redis. Thread-safe."""

    def __init__(
        self,
        *,
        probe: Callable[[], object] | None = None,
        on_recover: Callable[[], object] | None = None,
        on_state_change: Callable[[str], object] | None = None,
        probe_interval: float = 1.0,
        slow_call: float = 0.5,
    ) -> None:
        self._probe = probe
        self._on_recover = on_recover
        self._listeners: list[Callable[[str], object]] = []
        if on_state_change is not None:
            self._listeners.append(on_state_change)
        self.probe_interval = probe_interval
        self.slow_call = slow_call
        self._state = CLOSED
        self._next_probe = 0.0
        self._probing = False
        self._lock = threading.Lock()
        self._inflight: dict[int, float] = {}
        self._tokens = itertools.count()
        self.opened = 0  # times opened, for metrics
        self.skipped = 0  # calls not made since the breaker last opened
        self._stopped = threading.Event()

    @property
    def state(self) -> str:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state == CLOSED

    def add_listener(self, fn: Callable[[str], object]) -> None:
        """Call ``fn(state)`` after each change of state (``"open"``,
        ``"closed"``), on the thread that changed it."""
        self._listeners.append(fn)

    def allow(self) -> bool:
        """Whether a call to Redis may be made now."""
        if self._state == CLOSED:
            inflight = self._inflight
            if inflight and time.monotonic() - min(inflight.values(), default=0.0) > self.slow_call:
                self.trip(f"a call has been in flight for more than {self.slow_call:.2f} s")
                return False
            return True
        if self._probe is None and time.monotonic() >= self._next_probe:
            with self._lock:
                self._next_probe = time.monotonic() + self.probe_interval
            return True  # half-open: this call is the probe
        return False

    def call(self, fn: Callable[[], T], default: T) -> T:
        """``fn()``, or ``default`` when the breaker is open or ``fn`` fails
        because of Redis (which opens the breaker)."""
        try:
            return self.execute(fn)
        except Unavailable:
            return default

    def execute(self, fn: Callable[[], T]) -> T:
        """``fn()``; :class:`Unavailable` when the breaker is open or ``fn``
        fails because of Redis (which opens the breaker)."""
        if not self.allow():
            self.skipped += 1  # not atomic: a count for the log line, not an invariant
            raise Unavailable("redis circuit open")
        token = next(self._tokens)
        self._inflight[token] = time.monotonic()
        try:
            result = fn()
        except REDIS_ERRORS as err:
            self.trip(f"{type(err).__name__}: {err}")
            raise Unavailable(str(err)) from err
        finally:
            self._inflight.pop(token, None)
        if self._state != CLOSED and self._probe is None:
            self._close()
        return result

    def stop(self) -> None:
        """End the probing (the owner is closing)."""
        self._stopped.set()

    def trip(self, reason: str) -> None:
        """Open the breaker (idempotent)."""
        with self._lock:
            if self._state == OPEN:
                return
            self._state = OPEN
            self._next_probe = time.monotonic() + self.probe_interval
            self.opened += 1
            self.skipped = 0
            start_probe = self._probe is not None and not self._probing
            self._probing = self._probing or start_probe
        if start_probe:
            threading.Thread(
                target=self._probe_loop, name="cache-breaker-probe", daemon=True
            ).start()
        log.warning("redis cache unavailable (%s): reading from PostgreSQL only", reason)
        self._notify(OPEN)

    def _close(self) -> None:
        with self._lock:
            if self._state == CLOSED:
                return
            self._state = CLOSED
            self._inflight.clear()
        log.warning(
            "redis cache available again (%d cache calls skipped while it was away)", self.skipped
        )
        self._notify(CLOSED)

    def _notify(self, state: str) -> None:
        for listener in self._listeners:
            listener(state)

    def _probe_loop(self) -> None:
        try:
            while self._state != CLOSED:
                if self._stopped.wait(self.probe_interval):
                    return
                try:
                    if self._probe is not None:
                        self._probe()
                    if self._on_recover is not None:
                        self._on_recover()
                except REDIS_ERRORS as err:
                    log.debug("redis probe failed: %s", err)
                else:
                    self._close()
        finally:
            self._probing = False
