"""Durable event streams: Redis streams with consumer groups, reclaim of what
a dead consumer held, and a dead-letter stream.

A stream is the key ``{prefix}{stream:NAME}``; its dead letters are
``{prefix}{stream:NAME}:dead`` (same hash tag, one Cluster slot). Each entry
holds one field, ``payload``, the JSON text of what was added.

**Delivery: at least once.** A consumer of a group reads new entries
(``XREADGROUP >``), calls the handler and acknowledges (``XACK``) only after
the handler returned. An entry whose handler raised, or whose consumer died
or hung, stays pending; once it has been idle ``claim_idle`` seconds any
consumer of the group takes it over (``XAUTOCLAIM``) and runs its handler
again. Handlers must therefore be idempotent (the entry's ``id`` is stable
across deliveries). An entry delivered ``max_deliveries`` times without an
acknowledgement is moved, atomically with its ``XACK``, to the dead-letter
stream with its original id, payload, delivery count and last error.

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

import datetime as dt
import decimal
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError, ResponseError

from orchestrator_data.coordination.keys import checked_name, tagged
from orchestrator_data.errors import ValidationError

log = logging.getLogger("orchestrator_data.coordination.streams")

#: Default cap of a stream's length (approximate trimming).
DEFAULT_MAXLEN = 10_000
#: TTL of a stream and of its dead letters, refreshed on every add.
STREAM_TTL = 7 * 86400
#: Largest payload, in bytes of its JSON text (a stream entry or a pub/sub message).
MAX_PAYLOAD_BYTES = 1 << 20
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


# -- payloads -------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def encode_payload(payload: object) -> str:
    """The JSON text of ``payload`` (JSON values, plus UUIDs, datetimes and
    decimals as strings); :class:`ValidationError` on ``payload`` for anything
    else, NaN, or more than :data:`MAX_PAYLOAD_BYTES`. Never pickle: a reader
    in another process or language must not have to trust the writer."""
    try:
        text = json.dumps(payload, default=_json_default, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValidationError({"payload": [f"Must be a JSON value: {err}."]}) from None
    if len(text.encode()) > MAX_PAYLOAD_BYTES:
        raise ValidationError({"payload": [f"Must be at most {MAX_PAYLOAD_BYTES} bytes as JSON."]})
    return text


def decode_payload(data: bytes | str) -> Any:
    """The value of a payload's JSON text; ``ValueError`` when it is not JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("payload nested too deeply") from None


def as_text(value: bytes | str) -> str:
    """``value`` as a str (replies are bytes)."""
    return value.decode() if isinstance(value, bytes) else value


# -- streams --------------------------------------------------------------------


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


Handler = Callable[[StreamMessage], object]


class Consumer:
    """One consumer of a group; build it with ``dl.events.consume(...)``.

    With ``start`` (the default) a daemon thread loops over :meth:`run_once`
    until :meth:`close`, outliving Redis outages (errors logged and counted
    in ``errors``, bounded backoff, the group recreated if Redis lost
    it). Without, call :meth:`run_once` yourself.
    """

    def __init__(
        self,
        stream: Stream,
        group: str,
        consumer: str,
        handler: Handler,
        *,
        max_deliveries: int = 5,
        claim_idle: float = 30.0,
        block: float = MAX_BLOCK,
        count: int = 10,
        start_id: str = "0",
    ) -> None:
        self.stream = stream
        self.group = checked_name("group", group)
        self.consumer = checked_name("consumer", consumer)
        if isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int):
            raise ValidationError({"max_deliveries": ["Must be an integer."]})
        if max_deliveries < 1:
            raise ValidationError({"max_deliveries": ["Must be at least 1."]})
        if not claim_idle > 0:
            raise ValidationError({"claim_idle": ["Must be positive (seconds)."]})
        if start_id not in ("0", "$"):
            raise ValidationError({"start_id": ["Must be '0' (all retained) or '$' (new only)."]})
        self.handler = handler
        self.max_deliveries = max_deliveries
        self.claim_idle = float(claim_idle)
        self.count = max(1, int(count))
        self.start_id = start_id
        # Idle entries are looked for every half claim_idle (at most 5 s), and
        # a read never blocks past that, so a short claim_idle is honoured.
        self._claim_every = min(max(self.claim_idle / 2, 0.05), 5.0)
        self.block = min(max(float(block), 0.0), MAX_BLOCK, self._claim_every)
        #: Entries whose handler returned and that were acknowledged.
        self.handled = 0
        #: Handler calls that raised (the entry stays pending, to be redelivered).
        self.failed = 0
        #: Entries this consumer took over from an idle holder.
        self.reclaimed = 0
        #: Entries this consumer moved to the dead letters.
        self.dead_lettered = 0
        #: Passes of the thread that failed (Redis away, mostly); it goes on after a backoff.
        self.errors = 0
        self._scripts = stream._scripts
        self._group_ready = False
        self._cursor = "0-0"
        self._next_claim = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass --------------------------------------------------------------

    def run_once(self, block: float | None = None) -> int:
        """Take over idle entries (when due), else read new ones (waiting up
        to ``block`` seconds, default the consumer's), and handle them.
        Returns how many handler calls were made. Redis errors propagate."""
        self._ensure_group()
        try:
            batch = self._claim() if time.monotonic() >= self._next_claim else []
            if not batch:
                batch = self._read(self.block if block is None else min(block, MAX_BLOCK))
        except ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            # The stream or the group is gone (expired, Redis restarted
            # empty): create them again; nothing pending survived anyway.
            log.warning("stream %r lost group %r; recreating it", self.stream.name, self.group)
            self._group_ready = False
            return 0
        for message in batch:
            self._handle(message)
        return len(batch)

    def _ensure_group(self) -> None:
        if not self._group_ready:
            self._scripts.group(
                keys=[self.stream.key], args=[self.group, self.start_id, self.stream.ttl]
            )
            self._group_ready = True

    def _claim(self) -> list[StreamMessage]:
        reply = self._scripts.claim(
            keys=[self.stream.key, self.stream.dead_key],
            args=[
                self.group,
                self.consumer,
                int(self.claim_idle * 1000),
                self._cursor,
                self.count,
                self.max_deliveries,
                self.stream.maxlen,
                self.stream.ttl,
            ],
        )
        cursor, dead, trimmed, entries = reply
        self._cursor = as_text(cursor)
        # A full pass over the pending entries ends on 0-0: wait before the
        # next one; otherwise more may be waiting, go on at once.
        if self._cursor == "0-0":
            self._next_claim = time.monotonic() + self._claim_every
        if dead:
            self.dead_lettered += int(dead)
            log.warning(
                "stream %r group %r: %d entries unacknowledged after %d deliveries "
                "moved to the dead letters",
                self.stream.name,
                self.group,
                dead,
                self.max_deliveries,
            )
        if trimmed:
            log.warning(
                "stream %r group %r: %d pending entries were trimmed (MAXLEN) before being handled",
                self.stream.name,
                self.group,
                trimmed,
            )
        batch = [
            StreamMessage(self.stream.name, as_text(i), payload, int(n))
            for i, payload, n in entries
        ]
        self.reclaimed += len(batch)
        return batch

    def _read(self, block: float) -> list[StreamMessage]:
        # RESP2 reply: [[key, [(id, {field: value})]]], or None after the block.
        reply: Any = self._scripts.client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream.key: ">"},
            count=self.count,
            block=max(1, int(block * 1000)) if block > 0 else None,
        )
        batch = []
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                payload = fields.get(b"payload", fields.get("payload"))
                batch.append(StreamMessage(self.stream.name, as_text(entry_id), payload, 1))
        return batch

    def _handle(self, raw: StreamMessage) -> None:
        # ``raw.payload`` is the entry's JSON text here (None: no payload field).
        try:
            if raw.payload is None:
                raise ValueError("entry has no payload field")
            message = StreamMessage(raw.stream, raw.id, decode_payload(raw.payload), raw.deliveries)
        except ValueError as err:
            # Never going to parse: straight to the dead letters.
            self._dead_letter(raw, f"malformed payload: {err}")
            return
        try:
            self.handler(message)
        except Exception as err:  # a handler's failure is counted, never fatal
            self.failed += 1
            log.warning(
                "stream %r group %r: handler failed on %s (delivery %d of %d)",
                self.stream.name,
                self.group,
                raw.id,
                raw.deliveries,
                self.max_deliveries,
                exc_info=True,
            )
            if raw.deliveries >= self.max_deliveries:
                self._dead_letter(raw, f"{type(err).__name__}: {err}"[:1000])
            return  # left pending: redelivered once idle for claim_idle
        # Acknowledged only now: a crash before this line means redelivery.
        self._scripts.client.xack(self.stream.key, self.group, raw.id)
        self.handled += 1

    def _dead_letter(self, raw: StreamMessage, error: str) -> None:
        moved = self._scripts.dead(
            keys=[self.stream.key, self.stream.dead_key],
            args=[
                self.group,
                self.consumer,
                raw.id,
                raw.payload or "",
                raw.deliveries,
                error,
                self.stream.maxlen,
                self.stream.ttl,
            ],
        )
        if moved is not None:
            self.dead_lettered += 1
            log.warning(
                "stream %r group %r: %s moved to the dead letters after %d deliveries: %s",
                self.stream.name,
                self.group,
                raw.id,
                raw.deliveries,
                error,
            )

    # -- the thread ------------------------------------------------------------

    def start(self) -> Consumer:
        """Run :meth:`run_once` in a daemon thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run,
                name=f"stream-consumer {self.stream.name}/{self.group}/{self.consumer}",
                daemon=True,
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        delay = 0.05
        failing = False
        while not self._stop.is_set():
            try:
                self.run_once()
            except RedisError as err:
                self.errors += 1
                self._group_ready = False  # Redis may have restarted empty
                if not failing:
                    log.warning("stream consumer %s: Redis failed: %s", self.consumer, err)
                failing = True
                self._stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            except Exception:  # never fatal: logged, counted, retried after a pause
                self.errors += 1
                log.exception("stream consumer %s failed; going on", self.consumer)
                self._stop.wait(MAX_BACKOFF)
                continue
            if failing:
                log.info("stream consumer %s: Redis is back", self.consumer)
            failing, delay = False, 0.05

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Ask the thread to stop, without waiting for it."""
        self._stop.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the handler call in progress) and wait for
        it up to ``timeout`` seconds. What it held unacknowledged is taken
        over by the group's other consumers after ``claim_idle``."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Consumer {self.stream.name!r} group={self.group!r} consumer={self.consumer!r} "
            f"handled={self.handled} failed={self.failed} dead={self.dead_lettered}>"
        )
