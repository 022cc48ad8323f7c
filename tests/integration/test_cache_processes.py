"""The cache across real processes and a real Redis outage: L1 coherence by
broadcast, and PostgreSQL-only operation while a Redis server (one this test
starts itself) is down, with caching resuming after it returns."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import redis

from fixtures.own_servers import OwnRedis
from orchestrator_data import DataLayer, Settings

READER = r"""
import json, sys, time, uuid
from fixtures.own_servers import OwnRedis
from orchestrator_data import DataLayer, Settings

settings = Settings(**json.loads(sys.argv[1]))
ident = uuid.UUID(sys.argv[2])
with DataLayer(settings) as dl:
    assert dl.cache.wait_ready(30)
    def read():
        with dl.unit_of_work(read_only=True) as uow:
            return uow.agents.get(ident).status
    first = read()
    hits = dl.cache.stats()["l1_hits"]
    second = read()
    print(json.dumps({"status": second, "l1_hit": dl.cache.stats()["l1_hits"] == hits + 1}),
          flush=True)
    received = dl.cache.stats()["broadcasts_received"]
    sys.stdin.readline()  # the other process has committed
    deadline = time.monotonic() + 30
    while dl.cache.stats()["broadcasts_received"] == received and time.monotonic() < deadline:
        time.sleep(0.01)
    status = read()
    stats = dl.cache.stats()
    got = stats["broadcasts_received"] > received
    print(json.dumps({"status": status, "received": got}), flush=True)
"""


def make_agent(dl: DataLayer) -> uuid.UUID:
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name=f"agent-{uuid.uuid4().hex[:8]}", role="r")
        uow.commit()
        return agent.id


def read(dl: DataLayer, ident: uuid.UUID) -> str:
    with dl.unit_of_work(read_only=True) as uow:
        agent = uow.agents.get(ident)
        assert agent is not None
        return agent.status


def test_another_process_sees_a_commit_after_the_broadcast(
    data_layer: DataLayer, od_settings: Settings
) -> None:
    ident = make_agent(data_layer)
    settings = {
        "database_url": od_settings.database_url,
        "redis_url": od_settings.redis_url,
        "key_prefix": od_settings.key_prefix,
        "pool_min": 1,
        "warm_pool": False,
    }
    # Leaving the with block closes the pipes and reaps the process.
    with subprocess.Popen(
        [sys.executable, "-c", READER, json.dumps(settings), str(ident)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as reader:
        try:
            assert reader.stdout is not None and reader.stdin is not None
            before = json.loads(reader.stdout.readline())
            assert before == {"status": "idle", "l1_hit": True}  # held in the reader's L1
            with data_layer.unit_of_work() as uow:
                uow.agents.update(ident, status="busy")
                uow.commit()
            reader.stdin.write("committed\n")
            reader.stdin.flush()
            after = json.loads(reader.stdout.readline())
            assert after["received"] is True
            assert after["status"] == "busy"
            assert reader.wait(30) == 0
        finally:
            if reader.poll() is None:
                reader.kill()


# -- a Redis of our own, stopped and restarted mid-test ---------------------------


def wait_until(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_redis_outage_reads_and_writes_continue_and_caching_resumes(
    data_layer: DataLayer, make_data_layer: Any, own_redis: OwnRedis
) -> None:
    dl: DataLayer = make_data_layer(
        redis_url=own_redis.url, cache_probe_interval=0.1, pool_min=1, warm_pool=False
    )
    assert dl.cache.wait_ready()
    ident = make_agent(dl)
    assert read(dl, ident) == "idle"
    assert read(dl, ident) == "idle"
    dl.cache.wait_for_fills()
    # The server goes away with the cached row saved to disk: when it comes
    # back, the row it holds is stale.
    own_redis.save()
    own_redis.kill()

    with dl.unit_of_work() as uow:
        uow.agents.update(ident, status="busy")
        uow.commit()
    assert read(dl, ident) == "busy"
    other = make_agent(dl)
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.get(other) is not None
        assert uow.agents.count() == 2
    for _ in range(20):
        assert read(dl, ident) == "busy"
    stats = dl.cache.stats()
    assert stats["breaker"] == "open" or not stats["subscribed"]
    assert stats["invalidations_lost"] >= 1

    own_redis.start()
    assert wait_until(lambda: dl.cache.usable)
    assert read(dl, ident) == "busy"  # the saved row was voided on recovery
    hits = dl.cache.stats()["l1_hits"]
    assert read(dl, ident) == "busy"
    assert dl.cache.stats()["l1_hits"] == hits + 1  # caching resumed by itself
    with dl.unit_of_work() as uow:
        uow.agents.update(ident, status="offline")
        uow.commit()
    assert read(dl, ident) == "offline"


def test_a_data_layer_starts_and_works_while_redis_is_down(
    data_layer: DataLayer, make_data_layer: Any, own_redis: OwnRedis
) -> None:
    own_redis.kill()
    dl: DataLayer = make_data_layer(redis_url=own_redis.url, pool_min=1, warm_pool=False)
    ident = make_agent(dl)
    assert read(dl, ident) == "idle"
    assert not dl.cache.usable


def test_a_hung_redis_holds_up_only_the_calls_already_in_flight(
    data_layer: DataLayer, make_data_layer: Any, own_redis: OwnRedis
) -> None:
    dl: DataLayer = make_data_layer(
        redis_url=own_redis.url,
        cache_command_timeout=5.0,  # the call in flight hangs that long
        cache_slow_call=0.05,
        cache_probe_interval=0.1,
        pool_min=1,
        pool_max=4,
        warm_pool=False,
    )
    assert dl.cache.wait_ready()
    first, second = make_agent(dl), make_agent(dl)
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)  # Redis hangs, connections stay open
    try:
        stuck: list[str] = []
        reader = threading.Thread(target=lambda: stuck.append(read(dl, first)))
        reader.start()  # its L2 lookup hangs until the command timeout
        assert wait_until(lambda: bool(dl.cache.breaker._inflight))
        assert wait_until(lambda: dl.cache.breaker.state == "open" or not dl.cache.breaker.allow())
        # Everything else goes straight to PostgreSQL meanwhile.
        for _ in range(20):
            assert read(dl, second) == "idle"
        with dl.unit_of_work() as uow:
            uow.agents.update(second, status="busy")
            uow.commit()
        assert read(dl, second) == "busy"
        assert reader.is_alive()  # all of the above finished inside one hung call
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    reader.join(30)
    assert stuck == ["idle"]
    assert wait_until(lambda: dl.cache.usable)
    assert read(dl, second) == "busy"


def test_fills_resume_after_redis_forgets_the_fill_script(
    data_layer: DataLayer, make_data_layer: Any, own_redis: OwnRedis
) -> None:
    dl: DataLayer = make_data_layer(redis_url=own_redis.url, pool_min=1, warm_pool=False)
    assert dl.cache.wait_ready()
    first, second, third = make_agent(dl), make_agent(dl), make_agent(dl)
    read(dl, first)
    dl.cache.wait_for_fills()
    filled = dl.cache.stats()["l2_fills"]
    assert filled >= 1
    with redis.Redis(port=own_redis.port) as client:
        client.script_flush()  # as after a restart: the script's SHA is unknown now
        read(dl, second)  # its fill is refused (NOSCRIPT) and the script loaded again
        dl.cache.wait_for_fills()
        read(dl, third)
        dl.cache.wait_for_fills()
        assert dl.cache.stats()["l2_fills"] > filled
        keys = [k.decode() for k in client.scan_iter(match="*cache:agent:*")]
    assert any(str(third) in k for k in keys)
