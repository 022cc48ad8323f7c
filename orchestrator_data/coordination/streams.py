"""Durable event streams: :class:`Stream` (add, length, pending, dead
letters), the entries consumers are handed (:class:`StreamMessage`) and
give up on (:class:`DeadLetter`), and the Lua scripts that add, create
groups, reclaim and dead-letter atomically (:class:`StreamScripts`). The
consumer groups that read them, at least once, are in ``consumers.py``.

A stream is the key ``{prefix}{stream:NAME}``; its dead letters are
``{prefix}{stream:NAME}:dead`` (same hash tag, one Cluster slot). Each entry
holds one field, ``payload``, the JSON text of what was added (see
``payloads.py``).

**Limits.** A stream is capped at ``maxlen`` entries (default
:data:`DEFAULT_MAXLEN`, approximate ``MAXLEN ~`` trimming, so it may hold a
little more); entries trimmed before a group handled them are lost to it,
and a consumer logs how many. Every add refreshes the stream's TTL
(:data:`STREAM_TTL`): a stream nobody adds to for that long expires with its
groups. Put streams on a Redis that does not evict (``COORDINATION_REDIS_URL``
with ``maxmemory-policy noeviction``), and persist it (AOF) if entries must
survive a Redis restart: Redis acknowledges an add before it reaches disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

from orchestrator_data.coordination.keys import checked_name, tagged
from orchestrator_data.coordination.payloads import as_text, decode_payload, encode_payload
from orchestrator_data.errors import ValidationError

#: Default cap of a stream's length (approximate trimming).
DEFAULT_MAXLEN = 10_000
#: TTL of a stream and of its dead letters, refreshed on every add.
STREAM_TTL = 7 * 86400
#: Longest block of one XREADGROUP (below the coordination client's 5 s command timeout).
MAX_BLOCK = 1.0
#: Longest pause between attempts while Redis is unreachable.
MAX_BACKOFF = 2.0

# KEYS: stream. ARGV: maxlen, ttl s, payload. Returns the entry id.
_ADD = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'payload', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return id
"""

# KEYS: stream. ARGV: group, start id, ttl s. Creates the group (and the
# stream) unless it exists; a stream created here gets a TTL too.
_GROUP = """
local made = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
if type(made) == 'table' and made.err and not string.find(made.err, 'BUSYGROUP') then
  return redis.error_reply(made.err)
end
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS: stream, dead letters. ARGV: group, consumer, min idle ms, cursor,
# count, max deliveries, dead maxlen, ttl s.
# Takes over entries idle longer than min idle; those already delivered max
# deliveries times move to the dead letters (with their XACK) instead.
# Returns {next cursor, moved to dead letters, trimmed, {{id, payload, deliveries}...}}.
_CLAIM = """
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  'COUNT', ARGV[5])
local max = tonumber(ARGV[6])
local out, dead = {}, 0
for _, entry in ipairs(reply[2]) do
  if type(entry) == 'table' then
    local id, fields = entry[1], entry[2]
    local payload = false
    for i = 1, #fields, 2 do
      if fields[i] == 'payload' then payload = fields[i + 1] end
    end
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local n = 1
    if pending[1] then n = tonumber(pending[1][4]) end
    if n > max then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'id', id,
        'payload', payload or '', 'deliveries', n - 1, 'group', ARGV[1],
        'consumer', ARGV[2], 'error', 'not acknowledged after ' .. (n - 1) .. ' deliveries')
      redis.call('EXPIRE', KEYS[2], ARGV[8])
      redis.call('XACK', KEYS[1], ARGV[1], id)
      dead = dead + 1
    else
      out[#out + 1] = {id, payload, n}
    end
  end
end
local trimmed = 0
if reply[3] then trimmed = #reply[3] end
return {reply[1], dead, trimmed, out}
"""

# KEYS: stream, dead letters. ARGV: group, consumer, id, payload,
# deliveries, error, dead maxlen, ttl s. Moves the entry to the dead letters
# and acknowledges it, if this consumer still holds it; the dead-letter id,
# else nil (another consumer took it over meanwhile).
_DEAD = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not pending[1] or pending[1][2] ~= ARGV[2] then return false end
local dead = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'id', ARGV[3],
  'payload', ARGV[4], 'deliveries', ARGV[5], 'group', ARGV[1], 'consumer', ARGV[2],
  'error', ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[8])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return dead
"""


class StreamScripts:
    """The stream scripts registered on one client (SHA once, reloaded on NOSCRIPT)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.add = client.register_script(_ADD)
        self.group = client.register_script(_GROUP)
        self.claim = client.register_script(_CLAIM)
        self.dead = client.register_script(_DEAD)


@dataclass(frozen=True)
class StreamMessage:
    """One entry handed to a consumer's handler: its stable ``id`` (use it to
    make the handler idempotent), its ``payload``, and how many times it has
    been delivered, this time included."""

    stream: str
    id: str
    payload: Any
    deliveries: int


@dataclass(frozen=True)
class DeadLetter:
    """An entry moved to a stream's dead letters: the original entry's
    ``original_id`` and ``payload`` (``None`` if it was not JSON), its
    ``deliveries``, the ``group`` and ``consumer`` that gave up on it, and the
    last ``error``."""

    id: str
    original_id: str
    payload: Any
    deliveries: int
    group: str
    consumer: str
    error: str


class Stream:
    """A durable stream; build it with ``dl.events.stream(name)``."""

    def __init__(
        self,
        scripts: StreamScripts,
        name: str,
        *,
        prefix: str = "",
        maxlen: int = DEFAULT_MAXLEN,
        ttl: int = STREAM_TTL,
    ) -> None:
        self.name = checked_name("name", name)
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise ValidationError({"maxlen": ["Must be a positive integer."]})
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValidationError({"ttl": ["Must be a positive number of seconds."]})
        self.maxlen = maxlen
        self.ttl = ttl
        self.key = tagged(prefix, "stream", self.name)
        self.dead_key = self.key + ":dead"
        self._scripts = scripts

    def add(self, payload: object) -> str:
        """Append ``payload`` (JSON, see :func:`encode_payload`); returns the
        entry id. Trims the stream to about ``maxlen`` entries and refreshes
        its TTL in the same script. Redis errors propagate: nothing was added
        then, or (a timeout) it may have been."""
        data = encode_payload(payload)
        entry = self._scripts.add(keys=[self.key], args=[self.maxlen, self.ttl, data])
        return as_text(entry)

    def length(self) -> int:
        """Entries in the stream (acknowledged ones included, until trimmed)."""
        return int(self._scripts.client.xlen(self.key))

    def pending(self, group: str) -> int:
        """Entries delivered to ``group`` and not acknowledged yet (0 without the group)."""
        try:
            summary = self._scripts.client.xpending(self.key, checked_name("group", group))
        except ResponseError as err:
            if "NOGROUP" in str(err):
                return 0
            raise
        return int(summary["pending"])

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters."""
        # RESP2 replies: [(id, {field: value})], bytes throughout.
        rows: Any = self._scripts.client.xrange(self.dead_key, count=count)
        letters = []
        for entry_id, raw in rows or ():
            fields: dict[str, Any] = {as_text(k): v for k, v in raw.items()}
            try:
                payload = decode_payload(fields.get("payload", b""))
            except ValueError:
                payload = None
            letters.append(
                DeadLetter(
                    id=as_text(entry_id),
                    original_id=as_text(fields.get("id", b"")),
                    payload=payload,
                    deliveries=int(fields.get("deliveries", 0)),
                    group=as_text(fields.get("group", b"")),
                    consumer=as_text(fields.get("consumer", b"")),
                    error=as_text(fields.get("error", b"")),
                )
            )
        return letters

    def __repr__(self) -> str:
        return f"<Stream {self.name!r} maxlen~{self.maxlen}>"
