"""Coherence of the cache: generations, invalidation after commit, the
broadcast to other processes, and recovery after Redis was away.

Every entity has a *generation* in Redis (``cache:generation:{entity}``),
bumped by each committed write of the entity, atomically with deleting the
rows' keys and publishing the invalidation (the BUMP script). This process
mirrors the generations in :attr:`Coherence.generations`, kept current by
its own bumps and by the broadcasts of others, and uses them as fill fences
(see layer.py). All changes to the mirror and to L1 happen under the L1
backend's lock, so an L1 fill (checked under that lock) never slips between
an invalidation's generation bump and its deletes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from dogpile.cache.api import CachedValue
from redis import Redis

from orchestrator_data.cache import scripts, serialization
from orchestrator_data.cache.backends import LRUBackend
from orchestrator_data.cache.breaker import CLOSED, CircuitBreaker, Unavailable
from orchestrator_data.cache.invalidation import ROW_CACHED, Targets, targets
from orchestrator_data.cache.keys import Keys
from orchestrator_data.cache.stats import CacheStats

log = logging.getLogger("orchestrator_data.cache")

ENTITIES = ("agent", "task", "session", "achievement")

Fence = dict[str, "int | None"]


class Coherence:
    """Generations, invalidation and broadcast handling of one cache."""

    def __init__(
        self,
        *,
        keys: Keys,
        stats: CacheStats,
        breaker: CircuitBreaker,
        client: Redis | None,
        counter_ttl_ms: int,
        enabled: bool,
    ) -> None:
        self.keys = keys
        self.stats = stats
        self.breaker = breaker
        self.enabled = enabled
        self.origin = uuid.uuid4().hex
        self.generations: Fence = dict.fromkeys(ENTITIES)
        #: Subscribed to the broadcast with the generations loaded: L1 may be used.
        self.ready = False
        #: An invalidation could not reach Redis: repair before using L2 again.
        self.lost = False
        self._counter_ttl_ms = counter_ttl_ms
        self.l1: LRUBackend | None = None
        if client is not None:
            self._bump_script = client.register_script(scripts.BUMP)
            self._read_script = client.register_script(scripts.READ_COUNTERS)

    def attach(self, l1: LRUBackend) -> None:
        """The L1 backend whose entries this coherence drops."""
        self.l1 = l1

    def admit(self, key: str, value: Any) -> bool:
        """Whether an L1 fill may be stored (the L1 backend's ``admit``)."""
        # Runs under the L1 lock: an invalidation (which bumps the local
        # generation under the same lock) either happened before, and the
        # fill is refused, or happens after, and deletes what was filled.
        payload = value.payload if isinstance(value, CachedValue) else None
        if not (isinstance(payload, tuple) and len(payload) == 3):
            return False
        entity, gen, _ = payload
        if self.ready and gen is not None and self.generations.get(entity) == gen:
            self.stats.l1_fills += 1
            return True
        self.stats.fills_refused += 1
        return False

    def _drop_entity_rows_locked(self, entities: Iterable[str]) -> None:
        wanted = set(entities)
        if wanted:
            self._l1.discard_locked(
                [k for k in self._l1.keys_locked() if isinstance(k, tuple) and k[0] in wanted]
            )

    # -- invalidation ----------------------------------------------------------------

    def invalidate(self, items: Iterable[tuple[str, uuid.UUID | None, str]]) -> None:
        """Invalidate after a commit: ``(entity, id, action)`` items, ``id``
        None for "every row". Drops the L1 keys, deletes the L2 keys, bumps
        the generations (and epochs for cascades), broadcasts to the other
        processes. Never raises: if Redis is unreachable the breaker opens and
        the repair runs when it comes back."""
        if not self.enabled:
            return
        t = targets(items)
        if t:
            self._apply(t, everything=False)

    def invalidate_all(self) -> None:
        """Void every cached value of this key prefix, in every process."""
        if not self.enabled:
            return
        t = Targets(generations=set(ENTITIES), epochs=set(ROW_CACHED))
        self._apply(t, everything=True)

    def _apply(self, t: Targets, *, everything: bool) -> None:
        rows = sorted(t.rows, key=str)
        row_keys = [self.keys.entity(e, i) for e, i in rows]
        gens = sorted(t.generations)
        epochs = sorted(t.epochs)
        with self._l1.lock:
            if everything:
                self._l1.clear_locked()
            else:
                self._l1.discard_locked([(e, i.int) for e, i in rows])
                self._drop_entity_rows_locked(epochs)
            # Until Redis answers with the new values, no fill of these
            # entities is admitted.
            for e in gens:
                self.generations[e] = None
        self.stats.invalidations += len(row_keys) + len(gens)
        try:
            values = self.breaker.execute(
                lambda: self._bump(row_keys, rows, gens, epochs, everything)
            )
        except Unavailable:
            self.lost = True
            self.stats.invalidations_lost += 1
            return
        self.stats.broadcasts_sent += 1
        self._merge_generations(gens, values)

    def _bump(
        self,
        row_keys: list[str],
        rows: list[tuple[str, uuid.UUID]],
        gens: list[str],
        epochs: list[str],
        everything: bool,
    ) -> list[int]:
        counters = [self.keys.generation(e) for e in gens] + [self.keys.epoch(e) for e in epochs]
        message = {
            "o": self.origin,
            "t": time.time(),
            "r": [[e, str(i)] for e, i in rows],
            "g": gens,
            "e": epochs,
            "all": everything,
        }
        head = serialization.dumps(message)
        head = head[:-1] + ',"v":'
        result = self._bump_script(
            keys=counters + row_keys,
            args=[len(counters), self._counter_ttl_ms, self.keys.channel, head],
        )
        return [int(v) for v in result]

    def _merge_generations(self, entities: Sequence[str], values: Sequence[Any]) -> None:
        with self._l1.lock:
            for e, v in zip(entities, values):  # noqa: B905 - values may carry epochs after
                current = self.generations.get(e)
                self.generations[e] = max(int(v), current or 0)

    # -- broadcast -------------------------------------------------------------------

    def on_message(self, message: dict[str, Any]) -> None:
        """Another process committed: drop what it invalidated from L1."""
        if message.get("o") == self.origin:
            return  # applied locally before it was published
        sent = message.get("t")
        if isinstance(sent, (int, float)):
            self.stats.observe_lag(max(0.0, time.time() - sent))
        with self._l1.lock:
            if message.get("all"):
                self._l1.clear_locked()
            else:
                self._l1.discard_locked(_row_keys(message.get("r")))
                self._drop_entity_rows_locked(
                    [e for e in message.get("e", ()) if isinstance(e, str)]
                )
        self._merge_generations(list(message.get("g", ())), list(message.get("v", ())))

    def on_up(self) -> None:
        """Subscribed (again): load the generations, flush L1, trust it again."""
        values = self._read_counters()
        with self._l1.lock:
            self._l1.clear_locked()
            for e, v in zip(ENTITIES, values):  # noqa: B905
                self.generations[e] = max(v, self.generations.get(e) or 0)
            self.ready = True
        self.stats.l1_flushes += 1

    def on_down(self) -> None:
        """Subscription lost."""
        # Invalidations published from now on may never reach us: stop
        # trusting L1 until resubscribed (and flushed).
        with self._l1.lock:
            self.ready = False
            self._l1.clear_locked()
            for e in ENTITIES:
                self.generations[e] = None
        self.stats.l1_flushes += 1

    def _read_counters(self) -> list[int]:
        keys = [self.keys.generation(e) for e in ENTITIES]
        return [int(v) for v in self._read_script(keys=keys, args=[self._counter_ttl_ms])]

    def recover(self) -> None:
        """Redis answers again (called by the breaker's probe)."""
        # Runs in the probe thread with the breaker still open. Invalidations
        # that failed while Redis was away are repaired wholesale: every
        # generation and epoch is bumped (published to every process), so no
        # value cached before can be served again.
        if self.lost:
            self.lost = False
            try:
                values = self._bump([], [], list(ENTITIES), sorted(ROW_CACHED), True)
            except BaseException:
                self.lost = True
                raise
            with self._l1.lock:
                self._l1.clear_locked()
            self._merge_generations(ENTITIES, values)
        else:
            self._merge_generations(ENTITIES, self._read_counters())

    def breaker_changed(self, state: str) -> None:
        if state == CLOSED and self.lost:
            # An invalidation failed after the repair ran: repair again.
            self.breaker.trip("an invalidation is still to be repaired")

    @property
    def _l1(self) -> LRUBackend:
        assert self.l1 is not None, "attach() the L1 backend first"
        return self.l1


def _row_keys(pairs: Any) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for pair in pairs if isinstance(pairs, list) else ():
        try:
            out.append((str(pair[0]), uuid.UUID(pair[1]).int))
        except (TypeError, ValueError, IndexError):
            log.warning("ignoring a malformed key in a cache invalidation message")
    return out
