"""Events: :class:`Events`, the face of pub/sub and durable streams on the
coordination Redis (``dl.events``): publish and subscribe, send what a
transaction queued once it has committed, open streams and start their
consumers, flush and close.

**Pub/sub is at most once.** A message goes to the subscribers connected at
the moment it is published, and to nobody else: one that is disconnected
(Redis restarting, a network blip, its process busy reconnecting) never
sees it, and Redis keeps no copy. Use it for notifications a reader can
afford to miss (wake up, refresh a view); for events that must not be lost
use a stream (``dl.events.stream(name)``, see ``streams.py``).

Channels are ``{prefix}events:{channel}``: no hash tag (a channel is not a
key), but the prefix keeps test runs and tenants apart. Payloads are JSON.

**After commit.** The unit of work's outbox (``outbox.py``) hands the
messages of a committed transaction to :meth:`Events.send_after_commit`
once the transaction has ended and its connection is back in the pool; a
sender thread publishes them in commit order (what has queued up, in one
round trip). The committing code never waits for Redis, so a hung Redis
holds up no commit; and since the transaction has committed, a Redis
failure is counted (``lost_after_commit``) and logged once per outage, never
raised. ``dl.events.flush()`` waits until what was committed has been sent.

Subscriptions (``subscriptions.py``) and stream consumers (``consumers.py``)
run in threads of their own; the package's own events are in
``change_events.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from redis import Redis
from redis.exceptions import RedisError

from orchestrator_data.coordination.consumers import Consumer, Handler
from orchestrator_data.coordination.keys import checked_name
from orchestrator_data.coordination.payloads import encode_payload
from orchestrator_data.coordination.streams import (
    DEFAULT_MAXLEN,
    MAX_BLOCK,
    STREAM_TTL,
    Stream,
    StreamScripts,
)
from orchestrator_data.coordination.subscriptions import ChannelHandler, Subscription
from orchestrator_data.errors import OrchestratorDataError, ValidationError

log = logging.getLogger("orchestrator_data.coordination.events")

#: Most messages committed and not sent yet; beyond, new ones are dropped.
BACKLOG = 10_000

#: Seconds of silence after which a subscription pings its connection (and
#: as long again without an answer before it reconnects).
HEALTH_CHECK_INTERVAL = 5.0

#: A message ready to publish: (channel key, JSON text).
Encoded = tuple[str, str]


#: How long the sender waits for more committed messages before it sends (s).
COALESCE = 0.005


class Events:
    """Pub/sub and streams on the coordination Redis: ``client`` is that
    client, or a function returning it (called on first use, so a DataLayer
    without Redis can still be built). ``prefix`` is the key prefix."""

    def __init__(
        self,
        client: Redis | Callable[[], Redis],
        *,
        prefix: str = "",
        stream_maxlen: int = DEFAULT_MAXLEN,
        stream_ttl: int = STREAM_TTL,
        health_check_interval: float = HEALTH_CHECK_INTERVAL,
        backlog: int = BACKLOG,
    ) -> None:
        self._client = client if isinstance(client, Redis) else None
        self._factory = None if isinstance(client, Redis) else client
        self.prefix = prefix
        self.channel_prefix = f"{prefix}events:"
        self.stream_maxlen = stream_maxlen
        self.stream_ttl = stream_ttl
        self.health_check_interval = health_check_interval
        self._scripts: StreamScripts | None = None
        self._lock = threading.Lock()
        self._running: list[Subscription | Consumer] = []
        # The after-commit sender: a queue and one thread (started on first use).
        self.backlog = backlog
        self._queue: deque[Encoded] = deque()
        self._unsent = 0  # queued, or taken by the sender and not sent yet
        self._wake = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        self._closing = False
        self._losing = False
        #: Messages published after a commit / lost then (Redis failed) /
        #: dropped with a rolled-back transaction or savepoint.
        self.sent_after_commit = 0
        self.lost_after_commit = 0
        self.dropped_on_rollback = 0

    @property
    def client(self) -> Redis:
        if self._client is None:
            assert self._factory is not None
            self._client = self._factory()
        return self._client

    def channel_key(self, channel: str) -> str:
        """The Redis channel of ``channel``: ``{prefix}events:{channel}``."""
        return self.channel_prefix + checked_name("channel", channel)

    # -- pub/sub ---------------------------------------------------------------

    def publish(self, channel: str, payload: object) -> int:
        """Publish ``payload`` (JSON) on ``channel`` now; returns how many
        subscribers received it. Inside a unit of work use
        ``uow.events.publish``, which waits for the commit. Redis errors propagate."""
        data = encode_payload(payload)
        return int(self.client.publish(self.channel_key(channel), data))

    def send_after_commit(self, messages: Sequence[Encoded]) -> None:
        """Hand the encoded messages of a committed transaction to the sender
        thread, which publishes them in commit order. Never blocks on Redis
        and never raises: the commit has happened. Beyond ``backlog``
        unsent messages (Redis hung or away), new ones are dropped and
        counted in ``lost_after_commit``."""
        if not messages:
            return
        with self._wake:
            if self._closing or self._unsent + len(messages) > self.backlog:
                self.lost_after_commit += len(messages)
                self._lost_log(len(messages), "the queue of unsent events is full")
                return
            self._queue.extend(messages)
            self._unsent += len(messages)
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(
                    target=self._send_loop, name="events-sender", daemon=True
                )
                self._sender.start()
            self._wake.notify_all()

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every message committed so far was published (or lost);
        False if some were still unsent after ``timeout`` seconds."""
        with self._wake:
            return self._wake.wait_for(lambda: self._unsent == 0, timeout)

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:
                    return  # closing, and nothing left
                closing = self._closing
            if not closing:
                # Let the commits of the next moment join this batch: one
                # wake-up and one round trip for many commits, instead of a
                # thread switch that competes with the committing threads for
                # every one of them.
                time.sleep(COALESCE)
            with self._wake:
                # Whatever has queued up goes in one round trip.
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 1000))]
            try:
                pipe = self.client.pipeline(transaction=False)
                for key, data in batch:
                    pipe.publish(key, data)
                pipe.execute()
            except (RedisError, OSError, OrchestratorDataError) as err:
                with self._wake:
                    self.lost_after_commit += len(batch)
                    self._lost_log(len(batch), f"Redis failed: {err}")
            else:
                with self._wake:
                    self.sent_after_commit += len(batch)
                    if self._losing:
                        self._losing = False
                        log.info("events are published after commit again")
            finally:
                with self._wake:
                    self._unsent -= len(batch)
                    self._wake.notify_all()

    def _lost_log(self, n: int, why: str) -> None:
        # Pub/sub is at most once: losing events while Redis is away is the
        # contract, not a surprise, so INFO, once per outage (the cache warns
        # of the outage itself).
        level = logging.DEBUG if self._losing else logging.INFO
        self._losing = True
        log.log(level, "%d events lost after commit (%s); counted in lost_after_commit", n, why)

    def subscribe(
        self,
        channels: str | Iterable[str],
        handler: ChannelHandler,
        *,
        health_check_interval: float | None = None,
    ) -> Subscription:
        """Call ``handler(channel, payload)`` for every message published on
        ``channels`` from now on, in a daemon thread, until ``.close()``.
        At most once: see the module doc. :meth:`Subscription.wait_subscribed`
        says when messages start arriving."""
        names = (channels,) if isinstance(channels, str) else tuple(channels)
        if not names:
            raise ValidationError({"channels": ["Name at least one channel."]})
        keys = tuple(self.channel_key(n) for n in names)
        client = self.client  # resolved now: a missing Redis URL fails here, not in the thread
        interval = self.health_check_interval
        if health_check_interval is not None:
            interval = health_check_interval
        subscription = Subscription(
            client,
            keys,
            handler,
            channel_prefix=self.channel_prefix,
            health_check_interval=interval,
        )
        self._track(subscription)
        return subscription.start()

    # -- streams ---------------------------------------------------------------

    def stream(self, name: str, *, maxlen: int | None = None) -> Stream:
        """The durable stream ``name`` (see ``streams.py``), capped at about
        ``maxlen`` entries (default ``stream_maxlen``)."""
        return Stream(
            self._stream_scripts(),
            name,
            prefix=self.prefix,
            maxlen=self.stream_maxlen if maxlen is None else maxlen,
            ttl=self.stream_ttl,
        )

    def consume(
        self,
        name: str,
        group: str,
        consumer: str,
        handler: Handler,
        max_deliveries: int = 5,
        *,
        claim_idle: float = 30.0,
        block: float = MAX_BLOCK,
        count: int = 10,
        start_id: str = "0",
        start: bool = True,
    ) -> Consumer:
        """Consume stream ``name`` as ``consumer`` of ``group`` (created if
        missing, from ``start_id``: ``"0"`` all retained entries, ``"$"`` new
        ones only): ``handler(message)`` per entry, acknowledged once it
        returns. At least once: handlers must be idempotent. Entries idle
        ``claim_idle`` seconds in another consumer's hands are taken over;
        after ``max_deliveries`` deliveries without an acknowledgement an
        entry moves to the dead letters. With ``start`` a thread runs it;
        else call ``run_once()``."""
        worker = Consumer(
            self.stream(name),
            group,
            consumer,
            handler,
            max_deliveries=max_deliveries,
            claim_idle=claim_idle,
            block=block,
            count=count,
            start_id=start_id,
        )
        if start:
            self._track(worker)
            worker.start()
        return worker

    # -- lifecycle -------------------------------------------------------------

    def close(self, timeout: float = 2.0) -> None:
        """Send what was committed (waiting up to ``timeout`` seconds), then
        stop the sender and every subscription and consumer started here.
        Used afterwards, the sender starts again."""
        self.flush(timeout)
        with self._wake:
            self._closing = True
            self._wake.notify_all()
            sender, self._sender = self._sender, None
            running, self._running = self._running, []
        if sender is not None:
            sender.join(timeout)
        with self._wake:
            self._closing = False  # used again later: the threads start again
        for item in running:
            item.stop()  # all at once, then wait for each
        for item in running:
            item.close()

    def _stream_scripts(self) -> StreamScripts:
        if self._scripts is None:
            self._scripts = StreamScripts(self.client)
        return self._scripts

    def _track(self, item: Subscription | Consumer) -> None:
        with self._lock:
            self._running = [r for r in self._running if r.running]
            self._running.append(item)

    def count(self, name: str, n: int) -> None:
        """Add ``n`` to the counter ``name`` (thread-safe)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def __repr__(self) -> str:
        return f"<Events prefix={self.prefix!r}>"
