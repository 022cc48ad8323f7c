"""Contention at the default retry settings: many processes and threads
incrementing one row through ``run_in_transaction`` all commit, exactly."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

from fixtures.concurrency import increment_from_threads, make_counter
from orchestrator_data import DataLayer, Settings

PROCESSES, THREADS, PER_THREAD = 4, 8, 25


def test_one_hot_row_under_four_processes_of_eight_threads_commits_every_increment(
    data_layer: DataLayer, od_settings: Settings
) -> None:
    agent_id = make_counter(data_layer)
    # Default retry settings; only what isolates the run (its database and
    # key prefix) comes from the test's settings.
    settings = Settings(
        database_url=od_settings.database_url,
        redis_url=od_settings.redis_url,
        key_prefix=od_settings.key_prefix,
        pool_max=THREADS + 2,
    )
    started = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(PROCESSES, mp_context=spawn) as pool:
        futures = [
            pool.submit(increment_from_threads, settings, agent_id, THREADS, PER_THREAD)
            for _ in range(PROCESSES)
        ]
        results = [f.result(timeout=600) for f in futures]
    seconds = time.perf_counter() - started
    errors = [name for _, names in results for name in names]
    committed = sum(n for n, _ in results)
    print(f"{committed} increments in {seconds:.1f} s, errors: {errors}")
    assert errors == []
    assert committed == PROCESSES * THREADS * PER_THREAD
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.get_or_raise(agent_id).metadata_["n"] == committed
