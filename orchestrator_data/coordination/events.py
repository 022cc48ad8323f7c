"""Events: pub/sub notifications, the unit of work's outbox that publishes them
after commit, the package's own events, and :class:`Events`, the face of
pub/sub and durable streams (``dl.events``).

**Pub/sub is at most once.** A message goes to the subscribers connected at
the moment it is published, and to nobody else: one that is disconnected
(Redis restarting, a network blip, its process busy reconnecting) never
sees it, and Redis keeps no copy. Use it for notifications a reader can
afford to miss (wake up, refresh a view); for events that must not be lost
use a stream (``dl.events.stream(name)``, see ``streams.py``).

Channels are ``{prefix}events:{channel}``: no hash tag (a channel is not a
key), but the prefix keeps test runs and tenants apart. Payloads are JSON.

**After commit.** ``uow.events.publish(channel, payload)`` queues the message
in the transaction's outbox (``Session.info``), one frame per savepoint: a
savepoint that rolls back drops its messages, a released one hands them to
its parent. After the outermost COMMIT, once the transaction has ended and
its connection is back in the pool, the messages go to a sender thread that
publishes them in commit order (what has queued up, in one round trip); a
rollback drops them. The committing code never waits for Redis, so a hung
Redis holds up no commit; and since the transaction has committed, a Redis
failure is counted (``lost_after_commit``) and logged once per outage, never
raised. ``dl.events.flush()`` waits until what was committed has been sent.

**Subscriptions** run in a daemon thread that outlives Redis: it pings a
silent connection every ``health_check_interval`` seconds, and when the
connection fails or stops answering it reconnects with bounded backoff and
subscribes again. A handler's exception is logged and counted, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import event
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import SessionTransaction, sessionmaker

from orchestrator_data.capture.change import Change
from orchestrator_data.capture.change_capture import ChangeCapture
from orchestrator_data.coordination.keys import checked_name
from orchestrator_data.coordination.streams import (
    DEFAULT_MAXLEN,
    MAX_BACKOFF,
    MAX_BLOCK,
    STREAM_TTL,
    Consumer,
    Handler,
    Stream,
    StreamScripts,
    as_text,
    decode_payload,
    encode_payload,
)
from orchestrator_data.errors import OrchestratorDataError, ValidationError

log = logging.getLogger("orchestrator_data.coordination.events")

#: Channels of the package's own events (published after commit).
AGENT_STATUS = "agent.status"
TASK_STATUS = "task.status"
ACHIEVEMENT_AWARDED = "achievement.awarded"

#: Most messages committed and not sent yet; beyond, new ones are dropped.
BACKLOG = 10_000

#: Seconds of silence after which a subscription pings its connection (and
#: as long again without an answer before it reconnects).
HEALTH_CHECK_INTERVAL = 5.0

ChannelHandler = Callable[[str, Any], object]
#: A message ready to publish: (channel key, JSON text).
Encoded = tuple[str, str]

_FRAMES = "orchestrator_data.events.frames"
_SENDER = "orchestrator_data.events.sender"


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
        _ = self.client  # resolved now: a missing Redis URL fails here, not in the thread
        interval = self.health_check_interval
        if health_check_interval is not None:
            interval = health_check_interval
        subscription = Subscription(self, keys, handler, health_check_interval=interval)
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


class Subscription:
    """A running subscription; build it with ``dl.events.subscribe(...)``.

    Counters: ``received`` (messages handed to the handler), ``errors``
    (handler calls that raised), ``malformed`` (messages that were not
    JSON, skipped), ``reconnects`` (times it subscribed again after losing
    its connection: messages published meanwhile were missed)."""

    def __init__(
        self,
        events: Events,
        keys: tuple[str, ...],
        handler: ChannelHandler,
        *,
        health_check_interval: float,
    ) -> None:
        self.channels = tuple(k[len(events.channel_prefix) :] for k in keys)
        self.received = 0
        self.errors = 0
        self.malformed = 0
        self.reconnects = 0
        self._events = events
        self._keys = keys
        self._handler = handler
        self._interval = max(float(health_check_interval), 0.05)
        self._poll = min(0.5, self._interval / 2)
        self._up = threading.Event()
        self._ever_up = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Subscription:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"events-subscription {','.join(self.channels)}", daemon=True
            )
            self._thread.start()
        return self

    @property
    def subscribed(self) -> bool:
        """True while subscribed (as far as the thread knows)."""
        return self._up.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until subscribed (messages published from then on arrive)."""
        return self._up.wait(timeout)

    def stop(self) -> None:
        """Ask the thread to stop, without waiting for it."""
        self._stop.set()

    def close(self, timeout: float = 5.0) -> None:
        """Unsubscribe and stop the thread (waiting up to ``timeout`` seconds)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._events.client.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(*self._keys)
                self._listen(pubsub)
            except (RedisError, OSError) as err:
                level = logging.WARNING if self._up.is_set() else logging.DEBUG
                log.log(level, "subscription %s lost (%s); reconnecting", self.channels, err)
            except Exception:  # never fatal: logged, retried after a backoff
                log.exception("subscription %s failed; reconnecting", self.channels)
            finally:
                if self._up.is_set():
                    self._up.clear()
                    delay = 0.05  # it was up: the first retry comes quickly
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        pubsub.close()
            if not self._stop.is_set():
                self._stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, MAX_BACKOFF)

    def _listen(self, pubsub: Any) -> None:
        unconfirmed = set(self._keys)
        began = last_seen = time.monotonic()
        ping_sent: float | None = None
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=self._poll)
            now = time.monotonic()
            if message is None:
                # Silence: a hung server or a dead peer looks exactly like
                # no traffic, so ask, and give up when no answer comes.
                if ping_sent is not None and now - ping_sent > self._interval:
                    raise RedisTimeoutError(f"no answer to PING within {self._interval:g} s")
                if unconfirmed and now - began > 2 * self._interval + 5:
                    raise RedisTimeoutError("subscription not confirmed")
                if ping_sent is None and now - last_seen > self._interval:
                    pubsub.ping()
                    ping_sent = now
                continue
            last_seen, ping_sent = now, None
            kind = message.get("type")
            if kind == "message":
                self._dispatch(message["channel"], message["data"])
            elif kind == "subscribe":
                key = as_text(message["channel"])
                if self._up.is_set() and key == self._keys[0]:
                    # redis-py reconnected under us and subscribed again.
                    self.reconnects += 1
                unconfirmed.discard(key)
                if not unconfirmed and not self._up.is_set():
                    if self._ever_up:
                        self.reconnects += 1
                    self._ever_up = True
                    self._up.set()

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = as_text(channel)[len(self._events.channel_prefix) :]
        try:
            payload = decode_payload(data)
        except ValueError:
            self.malformed += 1
            log.warning("subscription: a message on %r is not JSON; skipped", name)
            return
        self.received += 1
        try:
            self._handler(name, payload)
        except Exception:  # a handler's failure is counted, never fatal
            self.errors += 1
            log.exception("subscription: the handler failed on a message of %r", name)

    def __repr__(self) -> str:
        state = "subscribed" if self.subscribed else "connecting"
        return f"<Subscription {self.channels} {state} received={self.received}>"


# -- after commit ----------------------------------------------------------------


@dataclass
class _Frame:
    """The messages queued in one transaction or savepoint."""

    transaction: SessionTransaction
    messages: list[Encoded] = field(default_factory=list)
    committed: bool = False


def _frame(frames: list[_Frame], transaction: SessionTransaction | None) -> _Frame | None:
    for frame in reversed(frames):
        if frame.transaction is transaction:
            return frame
    return None


class TransactionEvents:
    """Queues ``uow.events`` messages per transaction and publishes them
    after the outermost commit (see the module doc). One per DataLayer,
    installed on each of its session factories."""

    def __init__(self, events: Events) -> None:
        self.events = events

    def install(self, factory: sessionmaker[OrmSession]) -> None:
        """Attach to ``factory``'s sessions (never to the global Session). Install
        it after the change capture, so that caches are invalidated before
        subscribers hear of the commit."""
        event.listen(factory, "after_transaction_create", self._after_transaction_create)
        event.listen(factory, "after_commit", self._after_commit)
        event.listen(factory, "after_transaction_end", self._after_transaction_end)

    def _after_transaction_create(
        self, session: OrmSession, transaction: SessionTransaction
    ) -> None:
        if transaction.parent is None:
            session.info[_FRAMES] = [_Frame(transaction)]
            session.info[_SENDER] = self
        elif transaction.nested:
            session.info.setdefault(_FRAMES, []).append(_Frame(transaction))

    def _after_commit(self, session: OrmSession) -> None:
        # Dispatched while the committing transaction (a released savepoint,
        # or the root) is still the current one.
        current = session.get_nested_transaction() or session.get_transaction()
        frame = _frame(session.info.get(_FRAMES) or [], current)
        if frame is not None:
            frame.committed = True

    def _after_transaction_end(self, session: OrmSession, transaction: SessionTransaction) -> None:
        frames: list[_Frame] = session.info.get(_FRAMES) or []
        frame = _frame(frames, transaction)
        if frame is None:
            return  # a flush's subtransaction, or begun before install
        frames.remove(frame)
        if frame.committed and transaction.nested and frames:
            frames[-1].messages.extend(frame.messages)  # released: joins its parent
        elif frame.committed and transaction.parent is None:
            # Committed, and the connection is back in the pool.
            self.events.send_after_commit(frame.messages)
        elif frame.messages:
            self.events.count("dropped_on_rollback", len(frame.messages))


class UnitOfWorkEvents:
    """``uow.events``: publish after this unit of work commits."""

    def __init__(self, session: OrmSession) -> None:
        self._session = session

    def publish(self, channel: str, payload: object) -> None:
        """Queue ``payload`` (JSON, checked now) for ``channel``: published after
        the commit, dropped if the transaction, or the savepoint it was
        queued in, rolls back."""
        session = self._session
        current = session.get_nested_transaction() or session.get_transaction()
        if current is None:
            current = session.begin()  # right after a commit: the next transaction
        sender: TransactionEvents | None = session.info.get(_SENDER)
        frame = _frame(session.info.get(_FRAMES) or [], current)
        if sender is None or frame is None:
            raise OrchestratorDataError(
                "events are not installed on this session's factory (TransactionEvents.install)"
            )
        frame.messages.append((sender.events.channel_key(channel), encode_payload(payload)))


def outbox(session: OrmSession) -> UnitOfWorkEvents:
    """The ``uow.events`` of the unit of work running on ``session``."""
    return UnitOfWorkEvents(session)


# -- the package's own events ------------------------------------------------------


def install_change_events(changes: ChangeCapture, events: Events) -> None:
    """Publish, after each commit, ``agent.status`` / ``task.status`` when a
    row is created or its status changes (``{"agent_id"|"task_id", "old",
    "new"}``) and ``achievement.awarded`` when an achievement is created
    (``{"achievement_id", "agent_id", "type", "points"}``). Best effort, like
    every after-commit publish. Makes the capture carry old and new values."""

    def publish_changes(session: OrmSession, committed: Sequence[Change]) -> None:
        try:
            messages = [
                (events.channel_key(channel), encode_payload(payload))
                for channel, payload in change_events(committed)
            ]
        except Exception:  # never raised into the committing code: logged and counted
            log.exception("could not build the events of a commit")
            events.count("lost_after_commit", 1)
            return
        events.send_after_commit(messages)

    # Status changes can only be seen in the values: ask the capture for them
    # (the audit trail does too when it is enabled).
    changes.on_flush(_values_wanted, values=True)
    changes.on_commit(publish_changes)


def _values_wanted(session: OrmSession, flushed: Sequence[Change]) -> None:
    """A flush listener that only makes the capture record values."""


def change_events(committed: Iterable[Change]) -> list[tuple[str, dict[str, Any]]]:
    """The (channel, payload) pairs of the package's own events in ``committed``."""
    out: list[tuple[str, dict[str, Any]]] = []
    for change in committed:
        new = change.new
        if change.action == "delete" or new is None:
            continue
        if change.entity in ("agent", "task") and new.get("status") is not None:
            old = (change.old or {}).get("status") if change.action == "update" else None
            if old == new["status"]:
                continue
            channel = AGENT_STATUS if change.entity == "agent" else TASK_STATUS
            out.append(
                (channel, {f"{change.entity}_id": change.ident, "old": old, "new": new["status"]})
            )
        elif change.entity == "achievement" and change.action == "create":
            out.append(
                (
                    ACHIEVEMENT_AWARDED,
                    {
                        "achievement_id": change.ident,
                        "agent_id": new.get("agent_id"),
                        "type": new.get("achievement_type"),
                        "points": new.get("points"),
                    },
                )
            )
    return out
