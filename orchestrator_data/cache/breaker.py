"""Circuit breaker in front of Redis.

Closed: calls go through. The first call that loses its connection or times
out (after the client's own retries), or one that has been in flight longer
than ``slow_call``, opens it. A command error (Redis answered, with an error:
a key of the wrong type, an invalid expire, out of memory) is not an outage:
the breaker stays closed, the call raises :class:`CommandError` (a kind of
:class:`Unavailable`, so callers treat it as a miss or a dropped write), and
it is counted in :attr:`CircuitBreaker.command_errors` and logged at most
once per ``LOG_EVERY`` seconds.
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

from redis.exceptions import ClusterDownError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("orchestrator_data.cache")

T = TypeVar("T")

#: Anything a Redis call can raise because of Redis (as opposed to a bug of ours).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)
#: The errors that mean "Redis is down": the connection is lost or refused, a
#: call timed out, the server says it is not serving (LOADING, CLUSTERDOWN).
#: Only these open the breaker; any other RedisError is a command error.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    OSError,
)

#: Command errors are logged at most once per this many seconds.
LOG_EVERY = 10.0

CLOSED = "closed"
OPEN = "open"


class Unavailable(Exception):
    """Raised by :meth:`CircuitBreaker.execute` when Redis may not be used."""


class CommandError(Unavailable):
    """Redis refused one command (it is up): the call's effect did not happen."""


def is_outage(err: BaseException) -> bool:
    """Whether ``err`` (raised by a Redis call) means Redis is down."""
    return isinstance(err, OUTAGE_ERRORS)


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
        self.command_errors = 0  # calls Redis refused (the breaker stayed closed)
        self._command_logged_at = -LOG_EVERY
        self._command_unlogged = 0
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
        except OUTAGE_ERRORS as err:
            self.trip(f"{type(err).__name__}: {err}")
            raise Unavailable(str(err)) from err
        except RedisError as err:
            self.command_failed(err)
            if self._state != CLOSED and self._probe is None:
                self._close()  # half-open: Redis answered, so it is up
            raise CommandError(f"{type(err).__name__}: {err}") from err
        finally:
            self._inflight.pop(token, None)
        if self._state != CLOSED and self._probe is None:
            self._close()
        return result

    def command_failed(self, err: BaseException) -> None:
        """Count (and now and then log) a command Redis refused."""
        self.command_errors += 1  # not atomic: a metric
        now = time.monotonic()
        if now - self._command_logged_at < LOG_EVERY:
            self._command_unlogged += 1
            return
        unlogged, self._command_unlogged = self._command_unlogged, 0
        self._command_logged_at = now
        more = f" ({unlogged} more since the last report)" if unlogged else ""
        log.warning(
            "redis refused a cache command (%s: %s): treated as a miss%s",
            type(err).__name__,
            err,
            more,
        )

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
                except Exception:
                    # The repair failed for another reason (PostgreSQL away
                    # while the invalidation log is read): stay open, probe
                    # again. The thread must survive, or nothing would
                    # ever close the breaker.
                    log.warning("cache recovery failed; retrying", exc_info=True)
                else:
                    self._close()
        finally:
            self._probing = False
