"""Background writer of L2 fills, so that a miss does not pay a second Redis
round trip on the caller's time. Jobs are dropped when the queue is full or
the breaker is open: a lost fill only costs a later miss."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from orchestrator_data.cache.breaker import CircuitBreaker

log = logging.getLogger("orchestrator_data.cache")

Job = Callable[[], object]


class Filler:
    def __init__(self, breaker: CircuitBreaker, *, max_pending: int = 10_000) -> None:
        self._breaker = breaker
        self._queue: queue.Queue[Job | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0

    def submit(self, job: Job) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="cache-filler", daemon=True
                    )
                    self._thread.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1

    def wait(self) -> None:
        """Block until every submitted fill has been written (or dropped)."""
        if self._thread is not None:
            self._queue.join()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._breaker.call(job, None)
            finally:
                self._queue.task_done()
