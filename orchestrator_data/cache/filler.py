"""L2 fills, batched and written without waiting for Redis to answer.

A miss has already paid a Redis round trip (the L2 lookup) and a database
read; making it wait for a second round trip to store what it read would
put the fill on the caller's time. Fills are therefore buffered, sent in
one write when the transaction ends (or when ``batch`` of them are waiting),
on a connection of their own, and their replies are read later, whenever
they have arrived (at the next flush, or in :meth:`Filler.wait`). No
background thread: waking one per miss costs more than the write on a busy
host. Delay is harmless to correctness: every entity fill is a
compare-and-set against the generation its reader saw (see scripts.py).

Fills are dropped when the breaker is open or too many are outstanding: a
lost fill only costs a later miss.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.connection import Connection
from redis.exceptions import ResponseError

from orchestrator_data.cache.breaker import REDIS_ERRORS, CircuitBreaker

log = logging.getLogger("orchestrator_data.cache")

OnReply = Callable[[Any], object]
OnError = Callable[[ResponseError], object]


class Filler:
    def __init__(
        self,
        client: Redis | None,
        breaker: CircuitBreaker,
        *,
        max_pending: int = 10_000,
        batch: int = 32,
    ) -> None:
        self._client = client
        self._breaker = breaker
        self._max_pending = max_pending
        self._batch = batch
        self._conn: Connection | None = None
        self._buffer: list[tuple[OnReply, OnError | None, tuple[str | int, ...]]] = []
        self._pending: deque[tuple[OnReply, OnError | None]] = deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def submit(
        self, on_reply: OnReply, *command: str | int, on_error: OnError | None = None
    ) -> None:
        """Queue ``command``; ``on_reply(reply)`` runs when its reply is read,
        ``on_error(err)`` if Redis refused it."""
        if self._client is None or len(self._buffer) + len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        with self._lock:
            self._buffer.append((on_reply, on_error, command))
            full = len(self._buffer) >= self._batch
        if full:
            self.flush()

    def flush(self) -> None:
        """Send the queued fills in one write, without waiting for replies."""
        if not self._buffer:
            return
        with self._lock:
            batch, self._buffer = self._buffer, []
            if not batch:
                return
            if not self._breaker.allow():
                self.dropped += len(batch)
                return
            try:
                conn = self._connection()
                self._drain(conn, block=False)
                packed = conn.pack_commands([cmd for _, _, cmd in batch])  # type: ignore[no-untyped-call]
                conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
                self._pending.extend((on_reply, on_error) for on_reply, on_error, _ in batch)
            except REDIS_ERRORS as err:
                self.dropped += len(batch)
                self._broken(err)

    def wait(self) -> None:
        """Send what is queued and read every outstanding reply: the fills
        submitted so far are written (or known to be refused)."""
        self.flush()
        with self._lock:
            if self._conn is None:
                return
            try:
                self._drain(self._conn, block=True)
            except REDIS_ERRORS as err:
                self._broken(err)

    def stop(self) -> None:
        self.wait()
        with self._lock:
            if self._conn is not None and self._client is not None:
                self._client.connection_pool.release(self._conn)
                self._conn = None

    def _connection(self) -> Connection:
        if self._conn is None:
            assert self._client is not None
            self._conn = self._client.connection_pool.get_connection()
        return self._conn

    def _drain(self, conn: Connection, *, block: bool) -> None:
        while self._pending and (block or conn.can_read(timeout=0)):
            on_reply, on_error = self._pending.popleft()
            try:
                reply = conn.read_response()
            except ResponseError as err:
                # Redis refused the command (out of memory, a script it no
                # longer knows): the fill is lost.
                log.debug("cache fill refused by redis: %s", err)
                self.dropped += 1
                if on_error is not None:
                    on_error(err)
                continue
            on_reply(reply)

    def _broken(self, err: BaseException) -> None:
        self.dropped += len(self._pending)
        self._pending.clear()
        if self._conn is not None:
            self._conn.disconnect()  # type: ignore[no-untyped-call]
            if self._client is not None:
                self._client.connection_pool.release(self._conn)
            self._conn = None
        self._breaker.trip(f"{type(err).__name__}: {err}")
