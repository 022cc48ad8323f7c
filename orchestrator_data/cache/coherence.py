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

An invalidation Redis does not take (it is away, or refuses the command) is
*lost* unless it is in the durable log (journal.py): written in the
committing transaction while this process cannot invalidate, or right after
the commit when the failure comes later. Logged invalidations are delivered
by whichever process sweeps the log first; only one that could not even be
logged makes this process repair wholesale (every generation and epoch
bumped) when Redis is back.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dogpile.cache.api import CachedValue
from redis import Redis

from orchestrator_data.cache import scripts, serialization
from orchestrator_data.cache.backends import LRUBackend
from orchestrator_data.cache.breaker import CLOSED, CircuitBreaker, CommandError, Unavailable
from orchestrator_data.cache.invalidation import ENTITIES, ROW_CACHED, Targets, targets
from orchestrator_data.cache.journal import DATABASE_ERRORS, InvalidationLog
from orchestrator_data.cache.keys import Keys
from orchestrator_data.cache.stats import CacheStats
from orchestrator_data.cache.views import Fence

log = logging.getLogger("orchestrator_data.cache")

__all__ = ["ENTITIES", "Coherence", "Fence"]


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
        #: The subscription was lost, or could not be made: Redis is
        #: probably out of reach (cleared when subscribed again).
        self.unreachable = False
        #: An invalidation could not reach Redis, nor the durable log:
        #: repair wholesale before using L2 again.
        self.lost = False
        #: The durable log of undelivered invalidations (None: not installed).
        self.journal: InvalidationLog | None = None
        #: Called when a logged invalidation should be delivered soon.
        self.wake_sweeper: Callable[[], object] = lambda: None
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

    @property
    def can_invalidate(self) -> bool:
        """Whether an invalidation made now would very likely reach Redis
        (breaker closed, subscription not lost, no repair pending). When not,
        commits log their invalidations inside the committing transaction.
        (Still subscribing at start-up counts as reachable: an invalidation
        that fails then is logged right after its commit.)"""
        return self.breaker._state == CLOSED and not self.unreachable and not self.lost

    def invalidate(
        self, items: Iterable[tuple[str, uuid.UUID | None, str]], *, logged: bool = False
    ) -> None:
        """Invalidate after a commit: ``(entity, id, action)`` items, ``id``
        None for "every row". Drops the L1 keys, deletes the L2 keys, bumps
        the generations (and epochs for cascades), broadcasts to the other
        processes. ``logged``: the committing transaction already wrote them
        to the durable log. Never raises: what Redis does not take is logged
        (or, failing that, repaired wholesale when Redis is back)."""
        if not self.enabled:
            return
        t = targets(items)
        if t:
            self._apply(t, everything=False, logged=logged)

    def invalidate_all(self) -> None:
        """Void every cached value of this key prefix, in every process."""
        if not self.enabled:
            return
        self._apply(Targets.everything(), everything=True, logged=False)

    def _drop_local(
        self, t: Targets, *, everything: bool
    ) -> tuple[list[tuple[str, uuid.UUID]], list[str], list[str], list[str]]:
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
        return rows, row_keys, gens, epochs

    def _apply(self, t: Targets, *, everything: bool, logged: bool) -> None:
        rows, row_keys, gens, epochs = self._drop_local(t, everything=everything)
        self.stats.invalidations += len(row_keys) + len(gens)
        try:
            values = self.breaker.execute(
                lambda: self._bump(row_keys, rows, gens, epochs, everything)
            )
        except Unavailable as err:
            self.stats.invalidations_lost += 1
            if logged or self._log_now(t):
                if isinstance(err, CommandError):
                    self.wake_sweeper()  # Redis is up: deliver it (or trip) at once
                return
            self.lost = True
            if isinstance(err, CommandError):
                # Redis is up but refused it, and nothing else will deliver
                # it: stop using the cache until the repair has run.
                self.breaker.trip(f"an invalidation was refused ({err})")
            return
        self.stats.broadcasts_sent += 1
        self._merge_generations(gens, values)

    def _log_now(self, t: Targets) -> bool:
        journal = self.journal
        if journal is None or not journal.record_now(t):
            return False
        self.stats.invalidations_logged += 1
        return True

    # -- the durable log -------------------------------------------------------------

    def deliver_logged(self, *, direct: bool) -> int:
        """Deliver (and clear) the logged invalidations of this cache; how
        many records. ``direct``: call Redis without the breaker (from its
        probe, or on resubscribing), letting Redis errors propagate."""
        journal = self.journal
        if journal is None:
            return 0
        delivered = journal.deliver(lambda t: self._send_logged(t, direct=direct))
        if delivered:
            self.stats.invalidations_replayed += delivered
            log.info("delivered %d logged cache invalidation(s)", delivered)
        return delivered

    def _deliver_on_reconnect(self) -> None:
        # Redis errors propagate (the caller retries). PostgreSQL being away
        # does not hold the cache back: no unit of work reads anything
        # without it, and the sweeper delivers within one interval of its
        # return.
        try:
            self.deliver_logged(direct=True)
        except DATABASE_ERRORS as err:
            log.debug("cache invalidation log not read on reconnecting: %s", err)

    def sweep(self) -> None:
        """The periodic delivery (journal.Sweeper): while this process uses
        the cache; otherwise the breaker's probe or the resubscription does it."""
        if self.journal is not None and self.ready and self.breaker._state == CLOSED:
            self.deliver_logged(direct=False)

    def _send_logged(self, t: Targets, *, direct: bool) -> None:
        rows, row_keys, gens, epochs = self._drop_local(t, everything=False)

        def bump() -> list[int]:
            return self._bump(row_keys, rows, gens, epochs, False)

        if direct:
            values = bump()
        else:
            try:
                values = self.breaker.execute(bump)
            except CommandError as err:
                # Redis answers but will not take invalidations: nobody may
                # trust what it holds. The probe delivers them, then closes.
                self.breaker.trip(f"logged invalidations cannot be delivered ({err})")
                raise
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
        rows = _row_keys(message.get("r", []))
        gens, epochs, values = message.get("g", []), message.get("e", []), message.get("v", [])
        if not (
            rows is not None
            and _names(gens)
            and _names(epochs)
            and isinstance(values, list)
            and len(values) >= len(gens)
            and all(type(v) is int for v in values)
        ):
            # Not one of ours (or mangled): what it invalidated is unknown,
            # so drop all of L1 and reload the generations.
            self.stats.corrupt_values += 1
            log.warning("malformed cache invalidation message: flushing L1")
            self._resync()
            return
        with self._l1.lock:
            if message.get("all"):
                self._l1.clear_locked()
            else:
                self._l1.discard_locked(rows)
                self._drop_entity_rows_locked(epochs)
        self._merge_generations(gens, values)

    def _resync(self) -> None:
        values = self._read_counters()
        with self._l1.lock:
            self._l1.clear_locked()
            for e, v in zip(ENTITIES, values):  # noqa: B905
                self.generations[e] = max(v, self.generations.get(e) or 0)
        self.stats.l1_flushes += 1

    def on_up(self) -> None:
        """Subscribed (again): deliver the logged invalidations, load the
        generations, flush L1, trust it again."""
        # Before anything is read from the cache: whatever a process (maybe
        # dead now) could not invalidate while Redis was away is applied first.
        self._deliver_on_reconnect()
        values = self._read_counters()
        with self._l1.lock:
            self._l1.clear_locked()
            for e, v in zip(ENTITIES, values):  # noqa: B905
                self.generations[e] = max(v, self.generations.get(e) or 0)
            self.ready = True
            self.unreachable = False
        self.stats.l1_flushes += 1

    def on_unreachable(self) -> None:
        """A subscription attempt failed before any succeeded."""
        self.unreachable = True

    def on_down(self) -> None:
        """Subscription lost."""
        # Invalidations published from now on may never reach us: stop
        # trusting L1 until resubscribed (and flushed).
        self.unreachable = True
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
        # Runs in the probe thread with the breaker still open. Logged
        # invalidations are delivered first. One that could not even be
        # logged is repaired wholesale: every generation and epoch is bumped
        # (published to every process), so no value cached before can be
        # served again.
        self._deliver_on_reconnect()
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


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(e, str) for e in value)


def _row_keys(pairs: Any) -> list[tuple[str, int]] | None:
    """L1 keys of a message's ``[[entity, id], ...]``; None if any is malformed."""
    if not isinstance(pairs, list):
        return None
    out: list[tuple[str, int]] = []
    for pair in pairs:
        try:
            entity, ident = pair
            out.append((str(entity), uuid.UUID(ident).int))
        except (TypeError, ValueError, AttributeError):
            return None
    return out
