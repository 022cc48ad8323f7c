"""Subscriptions to pub/sub channels: :class:`Subscription`, the daemon
thread behind ``dl.events.subscribe(channels, handler)`` that hands each
message to the handler until it is closed.

The thread outlives Redis: it pings a silent connection every
``health_check_interval`` seconds, and when the connection fails or stops
answering it reconnects with bounded backoff and subscribes again (what was
published meanwhile is missed: pub/sub is at most once, see ``events.py``).
A handler's exception is logged and counted, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator_data.coordination.payloads import as_text, decode_payload
from orchestrator_data.coordination.streams import MAX_BACKOFF

# The logger subscriptions used before the split into modules: log filters on it still match.
log = logging.getLogger("orchestrator_data.coordination.events")

ChannelHandler = Callable[[str, Any], object]


class Subscription:
    """A running subscription; build it with ``dl.events.subscribe(...)``.

    Counters: ``received`` (messages handed to the handler), ``errors``
    (handler calls that raised), ``malformed`` (messages that were not
    JSON, skipped), ``reconnects`` (times it subscribed again after losing
    its connection: messages published meanwhile were missed)."""

    def __init__(
        self,
        client: Redis,
        keys: tuple[str, ...],
        handler: ChannelHandler,
        *,
        channel_prefix: str,
        health_check_interval: float,
    ) -> None:
        # ``keys`` are the channels' Redis names: ``channel_prefix`` + channel.
        self.channels = tuple(k[len(channel_prefix) :] for k in keys)
        self.received = 0
        self.errors = 0
        self.malformed = 0
        self.reconnects = 0
        self._client = client
        self._channel_prefix = channel_prefix
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
                pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
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
        name = as_text(channel)[len(self._channel_prefix) :]
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
