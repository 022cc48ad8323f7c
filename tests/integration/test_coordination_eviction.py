"""Coordination keys survive cache pressure when they live on their own
Redis: the cache Redis evicts (allkeys-lru, as the design's production
server), the coordination Redis (noeviction) keeps every lock and state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.own_servers import OwnRedis
from orchestrator_data import DataLayer


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[tuple[OwnRedis, OwnRedis]]:
    (tmp_path / "cache").mkdir()
    (tmp_path / "coordination").mkdir()
    cache = OwnRedis(tmp_path / "cache", "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    coordination = OwnRedis(tmp_path / "coordination", "--maxmemory-policy", "noeviction")
    cache.start()
    coordination.start()
    try:
        yield cache, coordination
    finally:
        cache.kill()
        coordination.kill()


def test_filling_the_cache_redis_evicts_no_lock_or_state(
    data_layer: DataLayer,
    make_data_layer: Callable[..., DataLayer],
    two_redis: tuple[OwnRedis, OwnRedis],
) -> None:
    cache, coordination = two_redis
    dl = make_data_layer(
        redis_url=cache.url, coordination_redis_url=coordination.url, warm_pool=False
    )
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name="pressure", role="coder", capabilities=["code"])
        uow.commit()
    locks = [dl.lock(f"pressure-{i}", ttl=300) for i in range(50)]
    for lock in locks:
        assert lock.acquire(blocking=False)
    dl.agent_state.heartbeat(agent.id, status="busy")
    for i in range(50):
        dl.rate_limiter.hit(f"pressure-{i}", limit=10, window=300)

    blob = b"x" * 10_000
    for i in range(2_000):  # 20 MB into a 4 MB cache Redis
        dl.redis.set(dl.key(f"cache:filler:{i}"), blob, ex=600)
    with cache.client() as client:
        assert int(client.info("stats")["evicted_keys"]) > 0
    assert all(lock.owned() for lock in locks)
    assert dl.agent_state.get(agent.id) is not None
    assert dl.rate_limiter.hit("pressure-0", limit=10, window=300).remaining == 8
    for lock in locks:
        lock.release()
