"""A Redis that stops answering (SIGSTOP) must not stall the database side:
connections go back to the pool before any post-commit Redis work, the
cache's client gives up after ``cache_command_timeout`` without retries, and
the breaker sends everyone else straight to PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from fixtures.own_servers import OwnRedis
from orchestrator_data import DataLayer

WRITERS = 6
READERS = 6
POOL_MAX = 4
HANG = 10.0
THINK = 0.01


def test_a_hung_redis_stalls_neither_writers_nor_readers(
    data_layer: DataLayer, make_data_layer: Callable[..., DataLayer], own_redis: OwnRedis
) -> None:
    dl = make_data_layer(
        redis_url=own_redis.url,
        pool_min=1,
        pool_max=POOL_MAX,
        pool_timeout=2.0,
        cache_probe_interval=0.2,
        warm_pool=False,
    )
    assert dl.cache.wait_ready()
    with dl.unit_of_work() as uow:
        ids = [
            uow.agents.create(name=f"hang-{i}", role="coder", capabilities=["code"]).id
            for i in range(WRITERS)
        ]
        uow.commit()

    phase = ["before"]
    done: Counter[tuple[str, str]] = Counter()
    errors: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def loop(kind: str, step: Callable[[], Any]) -> None:
        while not stop.is_set():
            try:
                step()
            except Exception as err:  # e.g. DatabaseTimeoutError: recorded, and the test fails
                errors.append(err)
                return
            with lock:
                done[(kind, phase[0])] += 1
            time.sleep(THINK)  # a service's own work between two units of work

    def write(ident: uuid.UUID) -> None:
        dl.run_in_transaction(lambda uow: uow.agents.update(ident, metadata={"at": time.time()}))

    def read(ident: uuid.UUID) -> None:
        with dl.unit_of_work(read_only=True) as uow:
            assert uow.agents.get(ident) is not None

    threads = [threading.Thread(target=loop, args=("write", lambda i=i: write(i))) for i in ids] + [
        threading.Thread(target=loop, args=("read", lambda i=i: read(i))) for i in ids[:READERS]
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        with lock:
            phase[0] = "hang"
        own_redis.pause()
        time.sleep(HANG)
        with lock:
            phase[0] = "after"
        own_redis.resume()
        time.sleep(2.0)
    finally:
        own_redis.resume()
        stop.set()
        for t in threads:
            t.join(30)

    for kind in ("write", "read"):
        rates = {p: done[(kind, p)] / (HANG if p == "hang" else 2.0) for p in ("before", "hang")}
        print(
            f"{kind}s per second: before the hang {rates['before']:.0f}, during {rates['hang']:.0f}"
        )
    assert errors == []
    # Both kinds of work went on, and at a real rate, all through the hang.
    assert done[("write", "hang")] >= 50
    assert done[("read", "hang")] >= 50

    # Caching resumes by itself once Redis answers again.
    deadline = time.monotonic() + 10
    while not dl.cache.usable and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dl.cache.usable
    read(ids[0])
    hits = dl.cache.stats()["l1_hits"]
    read(ids[0])
    assert dl.cache.stats()["l1_hits"] == hits + 1
