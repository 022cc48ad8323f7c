"""Counters of one cache: hits and misses per level, fills, invalidations,
broadcast lag, breaker and subscription state. Plain integers: an increment
lost to a thread switch now and then does not matter to a hit ratio."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass
class CacheStats:
    l1_hits: int = 0
    l1_misses: int = 0
    l2_hits: int = 0
    l2_misses: int = 0
    #: Reads that went to PostgreSQL because both levels missed.
    loads: int = 0
    #: Reads that bypassed the cache (transaction has written, FOR UPDATE,
    #: read-write unit of work, Redis down).
    bypassed: int = 0
    l1_fills: int = 0
    l2_fills: int = 0
    #: Fills refused because an invalidation overtook the read (stale-fill guard).
    fills_refused: int = 0
    #: Keys invalidated after commits (entity keys + query generations).
    invalidations: int = 0
    #: Invalidations that could not reach Redis (repaired on recovery).
    invalidations_lost: int = 0
    #: Invalidations written to PostgreSQL's cache_invalidations log because
    #: Redis could not take them (see journal.py).
    invalidations_logged: int = 0
    #: Logged invalidations delivered to Redis (by any process) and cleared.
    invalidations_replayed: int = 0
    #: L2 values that could not be ours (garbage, wrong shape or type): deleted, missed.
    corrupt_values: int = 0
    #: Read-only units of work stopped because a cached read and the
    #: database snapshot could disagree (ReadSkewError, retried).
    read_skews: int = 0
    broadcasts_sent: int = 0
    broadcasts_received: int = 0
    broadcast_lag_last: float = 0.0
    broadcast_lag_max: float = 0.0
    broadcast_lag_total: float = 0.0
    l1_flushes: int = 0

    def observe_lag(self, lag: float) -> None:
        self.broadcasts_received += 1
        self.broadcast_lag_last = lag
        self.broadcast_lag_total += lag
        if lag > self.broadcast_lag_max:
            self.broadcast_lag_max = lag

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        hits = self.l1_hits + self.l2_hits
        lookups = hits + self.loads
        data["hits"] = hits
        data["hit_ratio"] = hits / lookups if lookups else 0.0
        received = self.broadcasts_received
        data["broadcast_lag_mean"] = self.broadcast_lag_total / received if received else 0.0
        return data


class CacheCollector(Collector):
    """Exposes ``stats()`` in a DataLayer's prometheus registry, read at
    scrape time (nothing is counted twice)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        data = self._stats()
        requests = CounterMetricFamily(
            "orchestrator_data_cache_requests",
            "Cache lookups by level and result.",
            labels=["level", "result"],
        )
        for level in ("l1", "l2"):
            requests.add_metric([level, "hit"], data[f"{level}_hits"])
            requests.add_metric([level, "miss"], data[f"{level}_misses"])
        yield requests
        for name in (
            "loads",
            "bypassed",
            "l1_fills",
            "l2_fills",
            "fills_refused",
            "invalidations",
            "invalidations_lost",
            "invalidations_logged",
            "invalidations_replayed",
            "corrupt_values",
            "command_errors",
            "read_skews",
            "broadcasts_sent",
            "broadcasts_received",
        ):
            yield CounterMetricFamily(
                f"orchestrator_data_cache_{name}", f"Cache {name.replace('_', ' ')}.", data[name]
            )
        yield GaugeMetricFamily(
            "orchestrator_data_cache_broadcast_lag_seconds",
            "Lag of the last invalidation broadcast received.",
            data["broadcast_lag_last"],
        )
        yield GaugeMetricFamily(
            "orchestrator_data_cache_breaker_open",
            "1 while the Redis circuit breaker is open.",
            1.0 if data["breaker"] != "closed" else 0.0,
        )
        yield GaugeMetricFamily(
            "orchestrator_data_cache_l1_entries", "Entries in the L1 cache.", data["l1_entries"]
        )
