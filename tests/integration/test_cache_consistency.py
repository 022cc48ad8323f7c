"""Cache consistency under concurrency and failure, through the public API:

- a read-only unit of work never returns results of two committed states
  (cached reads and the database snapshot agree, or ReadSkewError, which
  ``run_in_transaction`` retries);
- a command Redis refuses is a miss, not an outage;
- corrupt values in Redis are misses, deleted, never raised or returned;
- an invalidation lost while Redis was unreachable outlives neither the
  outage nor its writer: the writer logs it in PostgreSQL inside its commit,
  and whichever process reaches Redis delivers it (writers here are killed
  with SIGKILL before they can).

Tests that kill or refuse Redis use a redis-server of their own; the writer
that "cannot reach Redis" is a subprocess whose Redis connections are refused.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import event, func, select

from fixtures.own_servers import OwnRedis
from orchestrator_data import DataLayer, Settings, UnitOfWork
from orchestrator_data.cache.backends import RedisBackend
from orchestrator_data.cache.keys import digest
from orchestrator_data.errors import ReadSkewError
from orchestrator_data.models import Agent, CacheInvalidation


def wired(dl: DataLayer) -> DataLayer:
    """``dl`` with its cache's invalidation log installed (idempotent: the
    DataLayer may do it itself)."""
    dl.cache.install(dl.changes, dl.engine)
    return dl


@pytest.fixture
def dl(make_data_layer: Callable[..., DataLayer], data_layer: DataLayer) -> DataLayer:
    # data_layer: tables emptied and the cache voided before the test.
    layer = wired(make_data_layer(pool_min=1, warm_pool=False))
    assert layer.cache.wait_ready()
    return layer


def make_agent(dl: DataLayer, role: str = "x", status: str = "idle") -> uuid.UUID:
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name=f"agent-{uuid.uuid4().hex[:8]}", role=role, status=status)
        uow.commit()
        return agent.id


def status_of(dl: DataLayer, ident: uuid.UUID) -> str:
    with dl.unit_of_work(read_only=True) as uow:
        agent = uow.agents.get(ident)
        assert agent is not None
        return agent.status


def cache_in_l1(dl: DataLayer, ident: uuid.UUID) -> str:
    """Read ``ident`` until a read is an L1 hit (a first read may not be
    cached if a broadcast overtakes it); its status."""
    for _ in range(50):
        hits = dl.cache.stats()["l1_hits"]
        status = status_of(dl, ident)
        if dl.cache.stats()["l1_hits"] == hits + 1:
            return status
        time.sleep(0.01)
    raise AssertionError(f"{ident} never reached L1")


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def logged_records(dl: DataLayer) -> int:
    """Undelivered invalidations of ``dl``'s cache (other tests' caches, on
    Redis servers of their own, may have left some of theirs)."""
    journal = dl.cache.coherence.journal
    assert journal is not None
    query = select(func.count()).where(CacheInvalidation.namespace == journal.namespace)
    with dl.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


# -- read skew in a read-only unit of work ------------------------------------------------


@pytest.mark.parametrize("isolation", ["SERIALIZABLE", "REPEATABLE READ"])
def test_a_read_only_unit_of_work_never_mixes_two_committed_states(
    dl: DataLayer, isolation: str
) -> None:
    make_agent(dl)
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="x") == 1  # cached from now on
    attempts: list[int] = []

    def report(uow: UnitOfWork) -> tuple[int, int]:
        attempts.append(1)
        counted = uow.agents.count(role="x")  # served by the cache: 1
        if len(attempts) == 1:
            make_agent(dl)  # another unit of work commits meanwhile
        listed = len(uow.agents.list(role="x").items)  # a miss: PostgreSQL's snapshot
        return counted, listed

    skews = dl.cache.stats()["read_skews"]
    assert dl.run_in_transaction(report, read_only=True, isolation=isolation) == (2, 2)
    assert len(attempts) == 2
    assert dl.cache.stats()["read_skews"] == skews + 1


def test_the_skew_is_a_retryable_error_outside_run_in_transaction(dl: DataLayer) -> None:
    make_agent(dl)
    with dl.unit_of_work(read_only=True) as uow:
        uow.agents.count(role="x")
    with pytest.raises(ReadSkewError), dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="x") == 1
        make_agent(dl)
        uow.agents.list(role="x")
    assert ReadSkewError("x").sqlstate == "40001"  # what the retry predicate reads


def test_a_snapshot_taken_first_is_kept_without_any_error(dl: DataLayer) -> None:
    first = make_agent(dl)
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="x") == 1  # a miss: the snapshot is taken here
        second = make_agent(dl)
        assert len(uow.agents.list(role="x").items) == 1  # the snapshot, not the cache
        assert uow.agents.get(second) is None
        assert uow.agents.count(role="x") == 1
        assert uow.agents.get(first) is not None
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="x") == len(uow.agents.list(role="x").items) == 2


def test_rows_unchanged_since_the_fence_are_still_served(dl: DataLayer) -> None:
    kept, other = make_agent(dl), make_agent(dl, role="y")
    status_of(dl, kept)
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.get(kept) is not None  # an L1 hit
        with dl.unit_of_work() as writer:
            writer.agents.update(other, status="busy")  # another row of the entity
            writer.commit()
        hits = dl.cache.stats()["l1_hits"]
        assert uow.agents.get(kept) is not None  # still as of the fence: no error
        assert dl.cache.stats()["l1_hits"] == hits + 1


def test_a_commit_heard_from_another_process_is_detected_too(
    dl: DataLayer, make_data_layer: Callable[..., DataLayer]
) -> None:
    other = make_data_layer(pool_min=1, warm_pool=False)  # another cache, like another process
    assert other.cache.wait_ready()
    make_agent(dl)
    with dl.unit_of_work(read_only=True) as uow:
        uow.agents.count(role="x")
    with pytest.raises(ReadSkewError), dl.unit_of_work(read_only=True) as uow:
        uow.agents.count(role="x")
        received = dl.cache.stats()["broadcasts_received"]
        make_agent(other)
        assert wait_until(lambda: dl.cache.stats()["broadcasts_received"] > received)
        uow.agents.list(role="x")


def test_redis_ahead_of_the_broadcast_is_detected_on_l2_reads(dl: DataLayer) -> None:
    ident = make_agent(dl)
    with dl.unit_of_work(read_only=True) as uow:
        uow.agents.count(role="x")
        uow.agents.get(ident)
    dl.cache.wait_for_fills()
    client = redis.Redis.from_url(dl.settings.redis_url or "")
    try:
        with pytest.raises(ReadSkewError), dl.unit_of_work(read_only=True) as uow:
            uow.agents.count(role="x")  # served from L1
            with dl.cache.l1.lock:  # the row only in L2 now
                dl.cache.l1.discard_locked([("agent", ident.int)])
            # A commit elsewhere whose broadcast has not arrived yet, and the
            # row filled again by another process after it.
            key = dl.cache.keys.entity("agent", ident)
            value = client.get(key)
            assert isinstance(value, bytes)
            head, _, row = value.partition(b"|")
            epoch, _, filled = head.partition(b":")
            later = client.incr(dl.cache.keys.generation("agent"))
            assert later > int(filled)
            client.set(key, epoch + b":" + str(later).encode() + b"|" + row, px=60_000)
            uow.agents.get(ident)
    finally:
        client.close()


def test_statements_outside_the_repositories_are_checked_too(dl: DataLayer) -> None:
    # The session hook the DataLayer installs (idempotent here).
    for factory in dl.session_factories():
        if not event.contains(factory, "do_orm_execute", dl.cache.do_orm_execute):
            event.listen(factory, "do_orm_execute", dl.cache.do_orm_execute)
    make_agent(dl)
    with dl.unit_of_work(read_only=True) as uow:
        uow.agents.count(role="x")
    with pytest.raises(ReadSkewError), dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="x") == 1
        make_agent(dl)
        uow.session.execute(select(Agent.id).where(Agent.role == "x")).all()
    with dl.unit_of_work(read_only=True) as uow:  # nothing served first: no check
        assert len(uow.session.execute(select(Agent.id)).all()) == 2


def test_read_committed_promises_only_committed_states(dl: DataLayer) -> None:
    make_agent(dl)
    with dl.unit_of_work(read_only=True, isolation="READ COMMITTED") as uow:
        assert uow.agents.count(role="x") == 1
        make_agent(dl)
        assert len(uow.agents.list(role="x").items) == 2  # no error at this level


# -- command errors are not outages ----------------------------------------------------------


def test_a_command_error_is_a_miss_that_leaves_the_cache_in_use(dl: DataLayer) -> None:
    kept = make_agent(dl)
    assert status_of(dl, kept) == "idle"
    stats = dl.cache.stats()
    client = redis.Redis.from_url(dl.settings.redis_url or "")
    try:
        with dl.unit_of_work(read_only=True, isolation="READ COMMITTED") as uow:
            gen = dl.cache.coherence.generations["agent"]
            assert gen is not None
            # A count's key holding a list: GET answers WRONGTYPE.
            key = dl.cache.keys.query("agent", gen, digest("count", {"role": "x"}))
            client.rpush(key, "not", "a", "count")
            client.expire(key, 60)
            assert uow.agents.count(role="x") == 1
        # An expire of 0 ms through the dogpile backend.
        backend = RedisBackend({"client": dl.redis, "breaker": dl.cache.breaker, "ttl": 0.0})
        backend.set_serialized(dl.settings.key_prefix + "zero-ttl", b"x")
    finally:
        client.close()
    after = dl.cache.stats()
    assert after["command_errors"] >= stats["command_errors"] + 2
    assert after["breaker"] == "closed" and after["breaker_opened"] == stats["breaker_opened"]
    assert after["l1_flushes"] == stats["l1_flushes"]  # nothing voided
    hits = after["l1_hits"]
    assert status_of(dl, kept) == "idle"
    assert dl.cache.stats()["l1_hits"] == hits + 1  # still cached


# -- corrupt values --------------------------------------------------------------------------


def test_corrupt_values_in_redis_are_misses(dl: DataLayer) -> None:
    ident = make_agent(dl)
    with dl.unit_of_work(read_only=True) as uow:
        uow.agents.get(ident)
        uow.agents.count(role="x")
    dl.cache.wait_for_fills()
    client = redis.Redis.from_url(dl.settings.redis_url or "")
    try:
        key = dl.cache.keys.entity("agent", ident)
        epoch = client.get(dl.cache.keys.epoch("agent"))
        assert isinstance(epoch, bytes)
        gen = dl.cache.coherence.generations["agent"]
        assert gen is not None
        count_keys = [k for k in client.scan_iter(match=f"*cache:query:agent:{gen}:*")]
        assert count_keys
        for garbage in (b"\xff\xfe", b'{"a": 1}', b"[" * 5000, b'["x"]'):
            client.set(key, epoch + b":" + str(gen).encode() + b"|" + garbage, px=60_000)
            for k in count_keys:
                client.set(k, b'"abc"', px=60_000)
            with dl.cache.l1.lock:
                dl.cache.l1.clear_locked()
            corrupt = dl.cache.stats()["corrupt_values"]
            with dl.unit_of_work(read_only=True) as uow:
                agent = uow.agents.get(ident)
                assert agent is not None and agent.status == "idle"
                assert uow.agents.count(role="x") == 1
            assert dl.cache.stats()["corrupt_values"] == corrupt + 2
            dl.cache.wait_for_fills()
            value = client.get(key)  # deleted, or refilled with the real row
            assert value is None or (isinstance(value, bytes) and not value.endswith(garbage))
        assert dl.cache.stats()["breaker"] == "closed"
    finally:
        client.close()


def test_corrupt_stats_are_misses(dl: DataLayer) -> None:
    ident = make_agent(dl)
    with dl.unit_of_work() as uow:
        uow.achievements.create(agent_id=ident, achievement_type="first_task", points=10)
        uow.commit()
    assert dl.stats.points_of(ident) == 10
    assert [e.points for e in dl.stats.leaderboard()] == [10]
    client = redis.Redis.from_url(dl.settings.redis_url or "")
    try:
        client.set(dl.stats.agent_key(ident), b"abc", ex=60)
        client.set(dl.stats.leaderboard_key(), b"[[" * 5000, ex=60)
        assert dl.stats.points_of(ident) == 10
        assert [e.points for e in dl.stats.leaderboard()] == [10]
        assert dl.stats.corrupt == 2
        client.set(dl.stats.agent_key(ident) + ":version", b"garbage", ex=60)
        with dl.unit_of_work() as uow:
            uow.achievements.create(agent_id=ident, achievement_type="tasks_10", points=5)
            uow.commit()
        assert dl.stats.points_of(ident) == 15  # invalidated despite the corrupt version
        assert dl.cache.breaker.closed
    finally:
        client.close()


# -- lost invalidations ----------------------------------------------------------------------

WRITER = r"""
import json, socket, sys, time, uuid
import redis.connection
from orchestrator_data import DataLayer, Settings

settings = Settings(**json.loads(sys.argv[1]))
ident = uuid.UUID(sys.argv[2])
if sys.argv[3] == "unreachable":
    def refuse(self, *args, **kwargs):
        raise ConnectionRefusedError("this process cannot reach Redis")
    redis.connection.Connection._connect = refuse
dl = DataLayer(settings)
dl.cache.install(dl.changes, dl.engine)
if sys.argv[3] == "reachable":
    assert dl.cache.wait_ready(30)
print("ready", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + 30
while dl.cache.coherence.can_invalidate and time.monotonic() < deadline:
    time.sleep(0.01)  # until this process knows Redis is gone
with dl.unit_of_work() as uow:
    uow.agents.update(ident, status="busy")
    uow.commit()
print(json.dumps({"committed": time.time(), "usable": dl.cache.usable}), flush=True)
time.sleep(3600)  # killed here, before it could ever reach Redis again
"""


def start_writer(settings: Settings, ident: uuid.UUID, mode: str) -> subprocess.Popen[str]:
    fields = {
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "key_prefix": settings.key_prefix,
        "pool_min": 1,
        "warm_pool": False,
        "cache_probe_interval": 60.0,  # it must not repair anything itself
    }
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, json.dumps(fields), str(ident), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    return writer


def commit_and_kill(writer: subprocess.Popen[str]) -> dict[str, Any]:
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write("go\n")
    writer.stdin.flush()
    line = writer.stdout.readline()
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    writer.stdin.close()
    writer.stdout.close()
    assert line, "the writer died before committing"
    result: dict[str, Any] = json.loads(line)
    return result


@pytest.fixture
def stopped_writers() -> Iterator[list[subprocess.Popen[str]]]:
    writers: list[subprocess.Popen[str]] = []
    yield writers
    for writer in writers:
        if writer.poll() is None:
            writer.kill()
            writer.wait(30)


def test_an_invalidation_lost_by_a_dead_writer_is_delivered_by_the_others(
    dl: DataLayer, stopped_writers: list[subprocess.Popen[str]]
) -> None:
    """The writer cannot reach Redis (the others can), commits, and is
    killed: the readers stop serving its stale row within the bound."""
    ident = make_agent(dl)
    assert cache_in_l1(dl, ident) == "idle"  # in the reader's L1 (and in L2)
    writer = start_writer(dl.settings, ident, "unreachable")
    stopped_writers.append(writer)
    done = commit_and_kill(writer)
    assert done["usable"] is False
    # Until some process delivers it, the commit's invalidation exists only
    # in PostgreSQL; the reader's sweeper delivers it within one interval.
    assert wait_until(lambda: status_of(dl, ident) == "busy", timeout=10)
    stale_for = time.time() - done["committed"]
    assert stale_for < dl.settings.cache_probe_interval + 1.0
    assert wait_until(lambda: logged_records(dl) == 0, timeout=5)
    cold = wired(DataLayer(dl.settings.with_overrides(pool_min=1, warm_pool=False)))
    try:
        assert cold.cache.wait_ready()
        assert status_of(cold, ident) == "busy"  # L2 holds no stale row either
    finally:
        cold.close()


def test_after_an_outage_no_process_serves_what_a_dead_writer_changed(
    make_data_layer: Callable[..., DataLayer],
    data_layer: DataLayer,
    tmp_path: Path,
    stopped_writers: list[subprocess.Popen[str]],
) -> None:
    """Redis dies with the row cached (and saved to disk), a writer commits
    while it is down and is killed; Redis comes back with the stale row."""
    server = OwnRedis(tmp_path)
    server.start()
    try:
        reader = wired(
            make_data_layer(
                redis_url=server.url, cache_probe_interval=0.1, pool_min=1, warm_pool=False
            )
        )
        assert reader.cache.wait_ready()
        ident = make_agent(reader)
        assert cache_in_l1(reader, ident) == "idle"
        reader.cache.wait_for_fills()
        server.save()  # the stale row survives the restart
        writer = start_writer(reader.settings, ident, "reachable")
        stopped_writers.append(writer)
        server.kill()
        done = commit_and_kill(writer)
        assert done["usable"] is False
        assert logged_records(reader) == 1
        assert status_of(reader, ident) == "busy"  # from PostgreSQL meanwhile
        server.start()
        assert wait_until(lambda: reader.cache.usable)
        # The first cached read after the reconnection is already right.
        assert status_of(reader, ident) == "busy"
        assert wait_until(lambda: logged_records(reader) == 0, timeout=5)
        with make_data_layer(redis_url=server.url, pool_min=1, warm_pool=False) as cold:
            assert cold.cache.wait_ready()
            assert status_of(cold, ident) == "busy"
    finally:
        server.kill()


def test_invalidations_redis_refuses_are_logged_and_delivered(
    make_data_layer: Callable[..., DataLayer], data_layer: DataLayer, tmp_path: Path
) -> None:
    """Redis is up but refuses writes (out of memory): reads go on, the
    invalidation is logged, every process stops using the cache until it is
    delivered, and it is delivered once Redis takes writes again."""
    server = OwnRedis(tmp_path, "--maxmemory-policy", "noeviction")
    server.start()
    try:
        layers = [
            wired(
                make_data_layer(
                    redis_url=server.url, cache_probe_interval=0.1, pool_min=1, warm_pool=False
                )
            )
            for _ in range(2)
        ]
        writer, reader = layers
        for layer in layers:
            assert layer.cache.wait_ready()
        ident = make_agent(writer)
        assert cache_in_l1(reader, ident) == "idle"
        with server.client() as admin:
            admin.config_set("maxmemory", 1)
            try:
                with writer.unit_of_work() as uow:
                    uow.agents.update(ident, status="busy")
                    uow.commit()
                assert writer.cache.stats()["invalidations_logged"] == 1
                # The reader stops serving the stale row within one sweep.
                started = time.monotonic()
                assert wait_until(lambda: status_of(reader, ident) == "busy", timeout=10)
                assert time.monotonic() - started < reader.settings.cache_probe_interval + 1.0
                assert not reader.cache.usable
            finally:
                admin.config_set("maxmemory", 0)
        assert wait_until(lambda: all(layer.cache.usable for layer in layers))
        assert wait_until(lambda: logged_records(reader) == 0, timeout=5)
        assert status_of(reader, ident) == "busy"
    finally:
        server.kill()
