"""Shared benchmark plumbing: a throw-away migrated database, timing, tables.

Benchmarks read DATABASE_URL / REDIS_URL (or start the embedded servers),
create their own database, and drop it when done.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from orchestrator_data import DataLayer, Settings
from orchestrator_data.config import sqlalchemy_url
from orchestrator_data.embedded.servers import resolve_settings


@dataclass(frozen=True)
class Servers:
    database_url: str  # a fresh, migrated database
    redis_url: str


@contextmanager
def bench_database(prefix: str = "od_bench") -> Iterator[Servers]:
    """A freshly migrated database on the configured (or embedded) server."""
    with resolve_settings() as base:
        assert base.database_url
        assert base.redis_url
        admin_url = make_url(sqlalchemy_url(base.database_url))
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = admin_url.set(database=name).render_as_string(hide_password=False)
        try:
            with DataLayer(Settings(database_url=url, warm_pool=False)) as dl:
                dl.migrate()
            yield Servers(url, base.redis_url)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def median_us(fn: Callable[[], object], *, iterations: int, warmup: int = 50) -> float:
    """Median wall time of one ``fn()`` call, in microseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    gc.disable()
    try:
        for _ in range(iterations):
            started = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - started)
    finally:
        gc.enable()
    return statistics.median(samples) / 1000.0


def interleaved_us(
    fns: dict[str, Callable[[], object]], *, iterations: int, batch: int = 20, warmup: int = 50
) -> dict[str, float]:
    """Median µs per call of each function, measured in interleaved batches so
    that drift in machine load hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds = max(1, iterations // batch)
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                started = time.perf_counter_ns()
                for _ in range(batch):
                    fn()
                samples[name].append((time.perf_counter_ns() - started) / batch)
    finally:
        gc.enable()
    return {name: statistics.median(values) / 1000.0 for name, values in samples.items()}


def iterations(default: int) -> int:
    """``default``, scaled by BENCH_SCALE (e.g. 0.1 for a quick run)."""
    return max(10, int(default * float(os.environ.get("BENCH_SCALE", "1"))))


def print_table(title: str, rows: list[tuple[str, float, str, float]]) -> None:
    """rows: (operation, median µs, baseline name, ratio to baseline)."""
    print(f"\n### {title}\n")
    print("| operation | median µs | vs | ratio |")
    print("|---|---:|---|---:|")
    for name, us, base, ratio in rows:
        print(f"| {name} | {us:.1f} | {base} | {ratio:.2f}x |")
