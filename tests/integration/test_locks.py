"""Distributed locks against a real Redis, real processes and a real pause:
mutual exclusion, fencing tokens, fenced writes in PostgreSQL, the watchdog,
and hand-off to a waiter without polling."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor

import pytest

from fixtures.coordination import fenced_sequence, locked_increments
from orchestrator_data import (
    DataLayer,
    LockLostError,
    LockNotAcquiredError,
    OrchestratorDataError,
    Settings,
    ValidationError,
)
from orchestrator_data.coordination.locks import Lock


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def plain_settings(od_settings: Settings) -> Settings:
    return Settings(
        database_url=od_settings.database_url,
        redis_url=od_settings.redis_url,
        key_prefix=od_settings.key_prefix,
    )


def test_eight_processes_under_one_lock_lose_no_update(
    data_layer: DataLayer, od_settings: Settings
) -> None:
    name, counter = unique("counter"), data_layer.key(unique("counter-value"))
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(8, mp_context=spawn) as pool:
        runs = [
            pool.submit(locked_increments, plain_settings(od_settings), name, counter, 25)
            for _ in range(8)
        ]
        done = sum(f.result(timeout=300) for f in runs)
    assert done == 200
    assert int(data_layer.coordination_redis.get(counter) or 0) == 200


def test_fencing_tokens_strictly_increase_across_processes(
    data_layer: DataLayer, od_settings: Settings
) -> None:
    name, sequence = unique("fenced"), data_layer.key(unique("sequence"))
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=spawn) as pool:
        runs = [
            pool.submit(fenced_sequence, plain_settings(od_settings), name, sequence, 250)
            for _ in range(4)
        ]
        seen = sorted(pair for f in runs for pair in f.result(timeout=300))
    assert [order for order, _ in seen] == list(range(1, 1001))
    fences = [fence for _, fence in seen]
    assert all(a < b for a, b in itertools.pairwise(fences))
    # Kept across expiry: a lock taken again after its key expired goes on.
    lock = data_layer.lock(name, ttl=0.05)
    assert lock.acquire(blocking=False)
    time.sleep(0.1)
    again = data_layer.lock(name)
    assert again.acquire(blocking=False)
    assert (
        again.fence is not None and lock.fence is not None and again.fence > lock.fence > fences[-1]
    )
    again.release()


def test_a_holder_paused_past_its_lease_can_neither_release_nor_write_after_the_next_holder(
    data_layer: DataLayer, od_settings: Settings
) -> None:
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(name="fenced-agent", role="coder", capabilities=["code"])
        uow.commit()
    name = unique("paused")
    config = {
        "database_url": od_settings.database_url,
        "redis_url": od_settings.redis_url,
        "key_prefix": od_settings.key_prefix,
    }
    code = "from fixtures.coordination import paused_holder; paused_holder()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(config), name, str(agent.id)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with holder:
        assert holder.stdout is not None and holder.stdin is not None
        first = json.loads(holder.stdout.readline())["fence"]
        holder.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.3)  # past its 1 s lease
            successor = data_layer.lock(name, ttl=30)
            assert successor.acquire(blocking=False)
            assert successor.fence is not None and successor.fence > first
            with data_layer.unit_of_work() as uow:
                uow.fence(successor)
                uow.agents.update(agent.id, metadata={"writer": "successor"})
                uow.commit()
        finally:
            holder.send_signal(signal.SIGCONT)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        outcome = json.loads(holder.stdout.readline())
        holder.wait(60)
    assert outcome == {"write": "LockLostError", "release": "LockLostError"}
    assert successor.owned()  # its key was never touched
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.get_or_raise(agent.id).metadata_ == {"writer": "successor"}
    successor.release()


def test_fencing_by_name_and_token_refuses_an_older_token(data_layer: DataLayer) -> None:
    name = unique("by-name")
    with data_layer.unit_of_work() as uow:
        assert uow.fence(name, 10) == 10
        uow.commit()
    with data_layer.unit_of_work() as uow:
        assert uow.fence(name, 10) == 10  # the same holder again: fine
        uow.commit()
    with pytest.raises(LockLostError), data_layer.unit_of_work() as uow:
        uow.fence(name, 9)
    with pytest.raises(ValidationError, match="token"), data_layer.unit_of_work() as uow:
        uow.fence(name, 0)


def test_the_watchdog_keeps_a_long_holder_and_reports_a_loss(data_layer: DataLayer) -> None:
    name = unique("watchdog")
    with data_layer.lock(name, ttl=0.3, auto_renew=True) as lock:
        time.sleep(1.0)  # more than 3 x the TTL
        assert lock.owned()
        assert not data_layer.lock(name).acquire(blocking=False)
    lost: list[Lock] = []
    with (
        pytest.raises(LockLostError),
        data_layer.lock(name, ttl=0.3, auto_renew=True, on_lost=lost.append) as lock,
    ):
        data_layer.coordination_redis.delete(data_layer.key(f"{{lock:{name}}}"))
        deadline = time.monotonic() + 2
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.lost and lost == [lock]


def test_a_waiter_is_handed_the_lock_at_once(data_layer: DataLayer) -> None:
    name = unique("handoff")
    delays: list[float] = []
    for _ in range(20):
        holder = data_layer.lock(name, ttl=10)
        assert holder.acquire()
        acquired = threading.Event()
        took: list[float] = []

        def wait(took: list[float] = took, acquired: threading.Event = acquired) -> None:
            waiter = data_layer.lock(name, ttl=10, blocking_timeout=10)
            assert waiter.acquire()
            took.append(time.perf_counter())
            acquired.set()
            waiter.release()

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.05)  # the waiter is blocked on the signal list by now
        released = time.perf_counter()
        holder.release()
        assert acquired.wait(5)
        thread.join(5)
        delays.append(took[0] - released)
    p50 = statistics.median(delays) * 1000
    print(f"hand-off release -> next holder: p50 {p50:.2f} ms, max {max(delays) * 1000:.2f} ms")
    assert p50 < 50  # well under redis-py's 100 ms polling interval


def test_timeouts_release_rules_and_names(data_layer: DataLayer) -> None:
    name = unique("rules")
    first = data_layer.lock(name, ttl=5)
    assert first.acquire()
    with pytest.raises(OrchestratorDataError, match="already held"):
        first.acquire()  # not reentrant
    started = time.monotonic()
    with pytest.raises(LockNotAcquiredError), data_layer.lock(name, blocking_timeout=0.2):
        pass
    assert 0.15 < time.monotonic() - started < 2
    assert not data_layer.lock(name).acquire(blocking=False)
    first.release()
    with pytest.raises(LockLostError):
        first.release()  # twice

    short = data_layer.lock(name, ttl=0.1)
    assert short.acquire()
    time.sleep(0.2)
    other = data_layer.lock(name, ttl=5)
    assert other.acquire(blocking=False)
    with pytest.raises(LockLostError):
        short.release()  # expired: the other holder's key stays
    assert other.owned()
    other.release()

    for bad in ("", "a{b}", "x" * 201):
        with pytest.raises(ValidationError, match="name"):
            data_layer.lock(bad)
    with pytest.raises(OrchestratorDataError, match="positive ttl"):
        data_layer.lock(name, ttl=0)
