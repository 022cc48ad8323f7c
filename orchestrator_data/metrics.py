"""Counters of one DataLayer, in a prometheus-client registry of its own
(several DataLayers in one process must not collide in the global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    """Prometheus metrics of a DataLayer; ``registry`` can be exposed with
    ``prometheus_client.generate_latest(registry)``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.transactions = Counter(
            "orchestrator_data_transactions",
            "Units of work finished, by outcome (commit, rollback, error).",
            ["outcome"],
            registry=self.registry,
        )
        self.transaction_retries = Counter(
            "orchestrator_data_transaction_retries",
            "Whole-transaction retries after a serialization failure or deadlock.",
            ["sqlstate"],
            registry=self.registry,
        )
        self.retries_exhausted = Counter(
            "orchestrator_data_retries_exhausted",
            "Transactions given up after the last retry.",
            registry=self.registry,
        )
        self.slow_queries = Counter(
            "orchestrator_data_slow_queries",
            "Statements slower than the slow-query threshold.",
            registry=self.registry,
        )
        self.transaction_seconds = Histogram(
            "orchestrator_data_transaction_seconds",
            "Duration of run_in_transaction calls, retries included.",
            registry=self.registry,
        )

    @property
    def retries(self) -> int:
        """Total number of transaction retries so far."""
        total = 0.0
        for metric in self.transaction_retries.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    total += sample.value
        return int(total)
