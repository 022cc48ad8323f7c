"""Exact sliding-window rate limits, decided in one Lua call on the server's clock.

Each key keeps the log of its admitted hits in one sorted set
``{prefix}{rate:KEY}`` (score: the server's ``TIME`` in microseconds, one
member per unit of cost). A hit removes what left the window, admits the hit when
the total plus its cost stays within the limit, and answers how many remain
and when room comes back. Time comes from Redis, never from the client, so
hosts with skewed clocks get the same answers; a rejected hit is not
recorded, so it never counts against the window.

Cost in Redis: a sorted-set member per admitted unit of cost, kept at most one
window (so a limit of N per window keeps at most N members).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from redis import Redis

from orchestrator_data.coordination.keys import checked_name, tagged
from orchestrator_data.errors import RateLimitedError, ValidationError

# KEYS: the log (a sorted set). ARGV: limit, window µs, cost, a unique id.
# One member per unit of cost (score: the server's time in µs), so the
# total is ZCARD. Returns {allowed 0/1, remaining, reset_after µs, retry_after µs}.
_HIT = """
local limit, window, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- Scores are microseconds (~1.8e15): formatted whole, never as 1.8e+15.
local stamp = string.format('%.0f', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%.0f', now - window))
local total = redis.call('ZCARD', KEYS[1])
local allowed, retry_after = 0, 0
if total + cost <= limit then
  if cost == 1 then
    redis.call('ZADD', KEYS[1], stamp, ARGV[4])
  else
    local members = {}
    for i = 1, cost do
      members[#members + 1] = stamp
      members[#members + 1] = ARGV[4] .. ':' .. i
    end
    redis.call('ZADD', KEYS[1], unpack(members))
  end
  total = total + cost
  allowed = 1
else
  -- Room for this cost comes back when the (total + cost - limit)-th oldest leaves.
  local nth = redis.call('ZRANGE', KEYS[1], total + cost - limit - 1, total + cost - limit - 1,
                         'WITHSCORES')
  retry_after = tonumber(nth[2]) + window - now
end
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reset_after = 0
if oldest[2] then reset_after = tonumber(oldest[2]) + window - now end
return {allowed, limit - total, reset_after, retry_after}
"""

#: Largest cost of one hit (each unit of cost is one member of the log).
MAX_COST = 10_000


@dataclass(frozen=True)
class RateLimit:
    """The answer to one hit: whether it was ``allowed``, how much of the
    limit is ``remaining``, seconds until the oldest counted hit leaves the
    window (``reset_after``), and, when refused, seconds until this hit's
    cost would fit (``retry_after``, 0 when allowed)."""

    allowed: bool
    remaining: int
    reset_after: float
    retry_after: float


class RateLimiter:
    """``dl.rate_limiter``: sliding-window limits on the coordination Redis.

    ``hit(key, limit=100, window=60, cost=1)`` counts a hit of ``key``;
    ``hit(name, subject)`` applies the limit named ``name`` in
    ``Settings.rate_limits`` (``{"api": (100, 60)}``) to ``subject``.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "",
        named: Mapping[str, tuple[int, float]] | None = None,
        default_window: float = 60.0,
    ) -> None:
        self._script = client.register_script(_HIT)
        self._prefix = prefix
        self._named = dict(named or {})
        self._default_window = default_window

    def hit(
        self,
        key: str,
        limit: int | str | None = None,
        window: float | None = None,
        cost: int = 1,
    ) -> RateLimit:
        """Count one hit of ``cost`` against ``key``; see the class doc. A
        refused hit is not counted. Bad arguments: :class:`ValidationError`."""
        full, limit_value, window_value = self._resolve(key, limit, window)
        most = min(limit_value, MAX_COST)
        if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= most:
            raise ValidationError({"cost": [f"Must be an integer between 1 and {most}."]})
        window_us = max(1, int(window_value * 1_000_000))
        allowed, remaining, reset_us, retry_us = self._script(
            keys=[tagged(self._prefix, "rate", full)],
            args=[limit_value, window_us, cost, uuid.uuid4().hex],
        )
        return RateLimit(
            allowed=bool(allowed),
            remaining=max(0, int(remaining)),
            reset_after=max(0.0, int(reset_us) / 1_000_000),
            retry_after=max(0.0, int(retry_us) / 1_000_000),
        )

    def check_or_raise(
        self,
        key: str,
        limit: int | str | None = None,
        window: float | None = None,
        cost: int = 1,
    ) -> RateLimit:
        """:meth:`hit`, raising :class:`RateLimitedError` (with
        ``retry_after``) when the hit is refused."""
        result = self.hit(key, limit, window, cost)
        if not result.allowed:
            raise RateLimitedError(key, result.retry_after)
        return result

    def _resolve(
        self, key: str, limit: int | str | None, window: float | None
    ) -> tuple[str, int, float]:
        if isinstance(limit, str):  # hit(name, subject): a limit named in Settings
            named = self._named.get(key)
            if named is None:
                known = ", ".join(sorted(self._named)) or "none"
                raise ValidationError(
                    {"key": [f"No rate limit named {key!r} in Settings.rate_limits ({known})."]}
                )
            checked_name("key", limit)
            limit_value, named_window = named
            return (
                f"{key}:{limit}",
                int(limit_value),
                float(named_window if window is None else window),
            )
        checked_name("key", key)
        limit_value = 100 if limit is None else limit
        if isinstance(limit_value, bool) or not isinstance(limit_value, int) or limit_value < 1:
            raise ValidationError({"limit": ["Must be a positive integer."]})
        window_value = self._default_window if window is None else window
        if (
            isinstance(window_value, bool)
            or not isinstance(window_value, (int, float))
            or not math.isfinite(window_value)
            or window_value <= 0
        ):
            raise ValidationError({"window": ["Must be a positive number of seconds."]})
        return key, limit_value, float(window_value)
