"""Consumers of durable streams: :class:`Consumer`, one member of a consumer
group, run in its own thread by ``dl.events.consume(...)`` or pass by pass
with :meth:`Consumer.run_once`. The streams themselves are in ``streams.py``.

**Delivery: at least once.** A consumer of a group reads new entries
(``XREADGROUP >``), calls the handler and acknowledges (``XACK``) only after
the handler returned. An entry whose handler raised, or whose consumer died
or hung, stays pending; once it has been idle ``claim_idle`` seconds any
consumer of the group takes it over (``XAUTOCLAIM``) and runs its handler
again. Handlers must therefore be idempotent (the entry's ``id`` is stable
across deliveries). An entry delivered ``max_deliveries`` times without an
acknowledgement is moved, atomically with its ``XACK``, to the dead-letter
stream with its original id, payload, delivery count and last error.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError, ResponseError

from orchestrator_data.coordination.keys import checked_name
from orchestrator_data.coordination.payloads import as_text, decode_payload
from orchestrator_data.coordination.streams import MAX_BACKOFF, MAX_BLOCK, Stream, StreamMessage
from orchestrator_data.errors import ValidationError

# The logger the consumer used before the split into modules: log filters on it still match.
log = logging.getLogger("orchestrator_data.coordination.streams")

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
