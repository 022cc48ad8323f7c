"""One conformance suite for both cache backends (dogpile API): the
in-process LRU (L1) and Redis (L2)."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator

import pytest
import redis
from dogpile.cache import CacheRegion
from dogpile.cache.api import NO_VALUE

from fixtures.concurrency import run_threads
from orchestrator_data import Settings
from orchestrator_data.cache.breaker import CircuitBreaker
from orchestrator_data.cache.regions import CacheRegions


@pytest.fixture(params=["memory", "redis"])
def region(request: pytest.FixtureRequest, od_settings: Settings) -> Iterator[CacheRegion]:
    regions = CacheRegions.declare(f"conformance-{uuid.uuid4().hex[:6]}")
    client = redis.Redis.from_url(od_settings.redis_url or "")
    prefix = f"{od_settings.key_prefix}conformance:{uuid.uuid4().hex[:8]}:"
    regions.configure(l1={"max_entries": 100, "ttl": 60}, l2={"client": client, "ttl": 60})
    chosen = regions.l1 if request.param == "memory" else regions.l2
    chosen.key_mangler = lambda key: prefix + key
    yield chosen
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)
    client.close()


def test_set_get_delete(region: CacheRegion) -> None:
    assert region.get("a") is NO_VALUE
    region.set("a", {"x": [1, 2]})
    assert region.get("a") == {"x": [1, 2]}
    region.delete("a")
    assert region.get("a") is NO_VALUE


def test_multi_operations(region: CacheRegion) -> None:
    region.set_multi({"a": 1, "b": "two", "c": None})
    assert region.get_multi(["a", "b", "c", "d"]) == [1, "two", None, NO_VALUE]  # type: ignore[no-untyped-call]
    region.delete_multi(["a", "b"])
    assert region.get_multi(["a", "b", "c"]) == [NO_VALUE, NO_VALUE, None]  # type: ignore[no-untyped-call]


def test_get_or_create_runs_the_creator_once_for_concurrent_misses(region: CacheRegion) -> None:
    calls: list[int] = []
    results: list[object] = []

    def creator() -> dict[str, int]:
        calls.append(1)
        return {"n": 42}

    def worker(_: int) -> None:
        results.append(region.get_or_create("shared", creator))

    assert run_threads(20, worker) == []
    assert calls == [1]
    assert results == [{"n": 42}] * 20


def test_a_cached_value_is_not_shared_state(region: CacheRegion) -> None:
    # L2 returns a fresh decode per call; L1 regions are only fed immutable
    # rows by the cache, but the region itself must round-trip values.
    region.set("v", {"k": 1})
    assert region.get("v") == {"k": 1}


def test_redis_values_are_json_with_a_ttl(od_settings: Settings) -> None:
    regions = CacheRegions.declare("json-check")
    client = redis.Redis.from_url(od_settings.redis_url or "")
    key = f"{od_settings.key_prefix}conformance:json:{uuid.uuid4().hex}"
    regions.configure(l1={}, l2={"client": client, "ttl": 30})
    regions.l2.set(key, {"a": [1, "x"]})
    raw = client.get(key)
    assert isinstance(raw, bytes)
    _, _, payload = raw.partition(b"|")
    assert json.loads(payload) == {"a": [1, "x"]}
    assert 0 < client.pttl(key) <= 30_000
    with pytest.raises(TypeError):
        regions.l2.set(key, object())  # not JSON: refused, never pickled
    client.delete(key)
    client.close()


def test_memory_backend_is_a_bounded_lru() -> None:
    regions = CacheRegions.declare("lru-check")
    regions.configure(l1={"max_entries": 3, "ttl": 60}, l2={"client": None})
    l1 = regions.l1
    for key in "abc":
        l1.set(key, key)
    assert l1.get("a") == "a"  # a is now the most recently used
    l1.set("d", "d")
    assert l1.get("b") is NO_VALUE
    assert [l1.get(k) for k in "acd"] == ["a", "c", "d"]


def test_memory_backend_never_returns_an_expired_entry() -> None:
    regions = CacheRegions.declare("ttl-check")
    regions.configure(l1={"ttl_for": lambda key: -1.0}, l2={"client": None})
    regions.l1.set("a", 1)
    assert regions.l1.get("a") is NO_VALUE


def test_redis_backend_degrades_to_misses_when_redis_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    breaker = CircuitBreaker(probe_interval=60)
    regions = CacheRegions.declare("down-check")
    regions.configure(l1={}, l2={"client": client, "breaker": breaker})
    regions.l2.set("a", 1)
    assert regions.l2.get("a") is NO_VALUE
    assert regions.l2.get_or_create("a", lambda: 7) == 7
    assert breaker.state == "open"
