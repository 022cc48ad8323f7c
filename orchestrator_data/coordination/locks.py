"""Distributed locks in Redis with fencing tokens, hand-off without polling,
and an optional watchdog.

A lock is a key ``{prefix}{lock:NAME}`` set with ``SET NX PX`` to a random
token; release and extend are Lua scripts that act only when the key still
holds that token, so nobody ever deletes or extends another holder's lock.

**Fencing.** Each acquisition takes, in the same script, a token that
strictly increases per name: ``max(previous + 1, Redis TIME in µs)``. The
counter key outlives the lock (its TTL is :data:`FENCE_TTL`), and the clock
floor keeps tokens increasing even if Redis loses the counter (restart,
eviction). A holder that was paused past its TTL may still believe it holds
the lock; ``uow.fence(lock)`` records the token in PostgreSQL in the unit of
work's transaction and refuses a token lower than one already recorded
(:class:`~orchestrator_data.LockLostError`), so such a holder cannot commit
after the next holder did.

**Waiting.** A waiter blocks on the lock's signal list (``BLPOP``); release
pushes one signal, which wakes exactly one waiter at once. The wait is also
bounded by the lock's remaining TTL and by :data:`MAX_WAIT`, so a lock that
expires without a release is noticed too.

**Limits.** Not reentrant: the same :class:`Lock` object refuses to acquire
twice, and another object for the same name waits like anyone else. A
Redis failover that loses the key lets a second holder in before the TTL:
the fence is what keeps that from corrupting PostgreSQL.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from types import TracebackType

from redis import Redis
from redis.exceptions import RedisError

from orchestrator_data.coordination.keys import checked_name, tagged
from orchestrator_data.errors import LockLostError, LockNotAcquiredError, OrchestratorDataError

log = logging.getLogger("orchestrator_data.coordination.locks")

#: How long a fence counter lives after the last acquisition of its lock.
FENCE_TTL = 30 * 86400
#: Longest single wait on the signal list (below the client's command timeout).
MAX_WAIT = 1.0

# KEYS: lock, fence counter. ARGV: token, ttl ms, fence ttl ms.
# Returns the fence on success, else minus the lock's remaining ms (-1: none).
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.pcall('GET', KEYS[2])) or 0
  local fence = math.max(last + 1, now)
  redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[3])
  return fence
end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then left = 1 end
return -left
"""

# KEYS: lock, signal list. ARGV: token, signal ttl ms. 1 if released, else 0.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lock. ARGV: token, ttl ms. 1 if extended, else 0.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class LockScripts:
    """The lock scripts registered on one client (SHA once, reloaded on NOSCRIPT)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.acquire = client.register_script(_ACQUIRE)
        self.release = client.register_script(_RELEASE)
        self.extend = client.register_script(_EXTEND)


class Lock:
    """One distributed lock; see the module doc. Build it with ``dl.lock(name)``.

    ``ttl`` (seconds, mandatory, > 0) is the lease; ``blocking_timeout``
    (seconds, None: forever) bounds the wait of ``with`` and :meth:`acquire`;
    with ``auto_renew`` a watchdog thread extends the lease every third of
    the TTL while held, and calls ``on_lost(lock)`` if the key is found gone
    or taken, after which leaving the ``with`` block raises
    :class:`LockLostError`.
    """

    def __init__(
        self,
        scripts: LockScripts,
        name: str,
        *,
        prefix: str = "",
        ttl: float = 30.0,
        blocking_timeout: float | None = None,
        auto_renew: bool = False,
        on_lost: Callable[[Lock], object] | None = None,
    ) -> None:
        self.name = checked_name("name", name)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise OrchestratorDataError("a lock needs a positive ttl (seconds)")
        self.ttl = float(ttl)
        self.blocking_timeout = blocking_timeout
        self.auto_renew = auto_renew
        self.on_lost = on_lost
        self._scripts = scripts
        self._key = tagged(prefix, "lock", self.name)
        self._fence_key = self._key + ":fence"
        self._signal_key = self._key + ":signal"
        self._token: str | None = None
        #: The fencing token of the current (or last) acquisition.
        self.fence: int | None = None
        # Plain flags, and the watchdog's Event only when there is one: an
        # uncontended acquire+release should cost two round trips, little else.
        self._lost = False
        self._stop: threading.Event | None = None
        self._watchdog: threading.Thread | None = None

    # -- acquire / release ---------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; True once held. Without ``blocking`` one attempt;
        otherwise wait up to ``timeout`` seconds (default ``blocking_timeout``,
        None: forever). False when not acquired."""
        if self._token is not None:
            raise OrchestratorDataError(f"lock {self.name!r} is already held by this Lock")
        limit = self.blocking_timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        token = secrets.token_hex(16)
        ttl_ms = max(1, int(self.ttl * 1000))
        client = self._scripts.client
        while True:
            reply = int(
                self._scripts.acquire(
                    keys=[self._key, self._fence_key], args=[token, ttl_ms, FENCE_TTL * 1000]
                )
            )
            if reply > 0:
                self._held(token, reply)
                return True
            if not blocking:
                return False
            wait = min(MAX_WAIT, -reply / 1000)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = min(wait, left)
            # Woken by a release (one waiter per release), or when the lock
            # would have expired, whichever comes first.
            client.blpop([self._signal_key], timeout=max(wait, 0.001))

    def release(self) -> None:
        """Release the lock. :class:`LockLostError` when it was not held any
        more (lease expired, or another holder has it); the other holder's
        key is never touched."""
        token = self._token
        self._stop_watchdog()
        self._token = None
        if token is None:
            raise LockLostError(f"lock {self.name!r} is not held")
        signal_ttl = max(1, int(self.ttl * 1000))
        released = self._scripts.release(
            keys=[self._key, self._signal_key], args=[token, signal_ttl]
        )
        if not released or self._lost:
            raise LockLostError(f"lock {self.name!r} was lost before its release (lease expired?)")

    def extend(self, ttl: float | None = None) -> None:
        """Reset the lease to ``ttl`` seconds (default the lock's TTL) from now.
        :class:`LockLostError` when the lock is no longer ours."""
        token = self._token
        seconds = self.ttl if ttl is None else ttl
        if token is None or not seconds > 0:
            raise LockLostError(f"lock {self.name!r} is not held")
        ms = max(1, int(seconds * 1000))
        if not self._scripts.extend(keys=[self._key], args=[token, ms]):
            self._mark_lost()
            raise LockLostError(f"lock {self.name!r} was lost (lease expired or taken)")

    def owned(self) -> bool:
        """Whether Redis still holds this lock for us (one GET)."""
        token = self._token
        if token is None:
            return False
        value = self._scripts.client.get(self._key)
        return (
            value is not None
            and (value.decode() if isinstance(value, bytes) else str(value)) == token
        )

    @property
    def lost(self) -> bool:
        """True once the watchdog (or :meth:`extend`) found the lock gone."""
        return self._lost

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Lock:
        if not self.acquire():
            waited = "" if self.blocking_timeout is None else f" within {self.blocking_timeout:g} s"
            raise LockNotAcquiredError(f"lock {self.name!r} not acquired{waited}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except LockLostError:
            if exc is None:
                raise
            # The body's own error says more; the loss goes to the log.
            log.warning("lock %r was lost while its block raised", self.name)

    def __repr__(self) -> str:
        state = "held" if self._token is not None else "free"
        return f"<Lock {self.name!r} {state} fence={self.fence}>"

    # -- internals -------------------------------------------------------------

    def _held(self, token: str, fence: int) -> None:
        self._token = token
        self.fence = fence
        self._lost = False
        if self.auto_renew:
            self._stop = stop = threading.Event()
            self._watchdog = threading.Thread(
                target=self._renew,
                args=(token, stop),
                name=f"lock-watchdog-{self.name}",
                daemon=True,
            )
            self._watchdog.start()

    def _renew(self, token: str, stop: threading.Event) -> None:
        interval = self.ttl / 3
        ms = max(1, int(self.ttl * 1000))
        expires = time.monotonic() + self.ttl
        while not stop.wait(interval):
            try:
                extended = self._scripts.extend(keys=[self._key], args=[token, ms])
            except RedisError as err:
                # Unknown: keep trying until the lease we know of runs out.
                if time.monotonic() < expires:
                    log.warning("could not renew lock %r: %s", self.name, err)
                    continue
                extended = 0
            if not extended:
                self._mark_lost()
                return
            expires = time.monotonic() + self.ttl

    def _mark_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        log.warning("lock %r was lost (key gone or taken)", self.name)
        if self.on_lost is not None:
            try:
                self.on_lost(self)
            except Exception:  # a callback's failure must not kill the watchdog silently
                log.exception("on_lost callback of lock %r failed", self.name)

    def _stop_watchdog(self) -> None:
        if self._stop is not None:
            self._stop.set()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(self.ttl)
