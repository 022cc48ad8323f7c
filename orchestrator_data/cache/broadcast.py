"""The L1 invalidation channel: a background subscriber per cache.

Every committed invalidation is published (by the BUMP script, atomically
with the Redis-side invalidation) on ``cache:invalidations``; each process's
subscriber drops the named L1 entries. While the subscription is down the
process cannot know what others changed, so the cache calls ``on_down``
(stop using L1) and, once subscribed again, ``on_up`` (flush L1, reload the
generations) before L1 is used again. An attempt that fails before the
subscription was ever up calls ``on_unreachable``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from redis import Redis

from orchestrator_data.cache.breaker import REDIS_ERRORS

log = logging.getLogger("orchestrator_data.cache")


class Subscriber:
    """Listens on ``channel`` in a daemon thread; reconnects every
    ``retry_interval`` seconds while Redis is away."""

    def __init__(
        self,
        client: Redis,
        channel: str,
        *,
        on_message: Callable[[dict[str, Any]], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
        on_unreachable: Callable[[], None] = lambda: None,
        retry_interval: float = 1.0,
    ) -> None:
        self._client = client
        self._channel = channel
        self._on_message = on_message
        self._on_up = on_up
        self._on_down = on_down
        self._on_unreachable = on_unreachable
        self._retry_interval = retry_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.up = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"cache-subscriber {self._channel}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self._channel)
                # Wait for the confirmation: only then is nothing published
                # from now on lost to us, and L1 may be trusted again.
                while True:
                    first = pubsub.get_message(timeout=1.0)
                    if first is not None and first.get("type") == "subscribe":
                        break
                    if self._stop.is_set():
                        return
                self._on_up()
                self.up = True
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
            except REDIS_ERRORS as err:
                log.debug("cache subscription lost: %s", err)
            except Exception:
                log.exception("cache subscriber failed; resubscribing")
            finally:
                if self.up:
                    self.up = False
                    self._on_down()
                elif not self._stop.is_set():
                    self._on_unreachable()
                with contextlib.suppress(*REDIS_ERRORS):
                    pubsub.close()
            self._stop.wait(self._retry_interval)

    def _dispatch(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            message = None
        # Not a JSON object: hand on an empty one, which the cache treats as
        # malformed (it cannot know what was invalidated, so it flushes L1).
        self._on_message(message if isinstance(message, dict) else {})
