"""Corrupt values and command errors, with fake Redis clients (no server):
whatever Redis hands back, the cache's readers never raise, never return a
value of the wrong type, count it and delete it; a command Redis refuses is
a miss that leaves the breaker closed. Plus the two small races: an empty
``delete_multi`` and the L1 expiry."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, cast

import pytest
from dogpile.cache.api import NO_VALUE
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from orchestrator_data.achievements.stats import StatsCache
from orchestrator_data.cache import serialization
from orchestrator_data.cache.backends import LRUBackend, RedisBackend
from orchestrator_data.cache.breaker import CircuitBreaker, CommandError
from orchestrator_data.cache.filler import Filler
from orchestrator_data.cache.keys import Keys
from orchestrator_data.cache.l2 import L2, MOVED
from orchestrator_data.cache.query_codecs import SCALAR, RowsCodec
from orchestrator_data.cache.serialization import MAX_JSON_DEPTH, RowCodec
from orchestrator_data.cache.stats import CacheStats
from orchestrator_data.models import Agent, Task
from orchestrator_data.uow import UnitOfWork

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
IDENT = uuid.UUID(int=7)


class FakeRedis:
    """The few commands the readers use, over a dict; ``fail`` makes every
    command raise that error."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = dict(values or {})
        self.deleted: list[str] = []
        self.fail: Exception | None = None

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def get(self, key: str) -> Any:
        self._check()
        return self.values.get(key)

    def mget(self, *keys: Any) -> list[Any]:
        self._check()
        wanted = list(keys[0]) if len(keys) == 1 and isinstance(keys[0], list) else list(keys)
        return [self.values.get(k) for k in wanted]

    def delete(self, *keys: str) -> int:
        self._check()
        if not keys:
            raise ResponseError("wrong number of arguments for 'del' command")
        self.deleted.extend(keys)
        return sum(self.values.pop(k, None) is not None for k in keys)

    def eval(self, *args: Any) -> int:
        self._check()
        return 1

    def register_script(self, body: str) -> Any:
        def run(keys: list[str], args: list[Any], client: Any = None) -> int:
            (client or self).calls.append(("script", keys))
            return 1

        return run

    def pipeline(self, transaction: bool = True) -> FakeRedis:
        return self

    def execute(self) -> list[Any]:
        self._check()
        return []

    @property
    def calls(self) -> list[Any]:
        calls: list[Any] = self.__dict__.setdefault("_calls", [])
        return calls


def agent_row() -> tuple[Any, ...]:
    codec = RowCodec(Agent)
    agent = Agent(
        id=IDENT,
        name="a",
        role="r",
        status="idle",
        capabilities=["plan"],
        metadata_={"tier": 1},
        created_at=NOW,
        updated_at=NOW,
    )
    return codec.from_instance(agent)


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def l2_with(values: dict[str, Any]) -> tuple[L2, FakeRedis, CacheStats, CircuitBreaker]:
    client = FakeRedis(values)
    breaker = CircuitBreaker(probe_interval=3600)
    stats = CacheStats()
    l2 = L2(
        client=cast(Redis, client),
        breaker=breaker,
        keys=Keys("p:"),
        stats=stats,
        filler=Filler(None, breaker),
        row_ttl={"agent": 300.0},
        counter_ttl_ms=1000,
    )
    return l2, client, stats, breaker


# -- row and query codecs ------------------------------------------------------------


def test_a_row_with_a_value_of_the_wrong_type_is_refused() -> None:
    codec = RowCodec(Agent)
    good = codec.to_json(agent_row())
    assert codec.from_json(list(good)) == agent_row()
    bad_values = {
        1: 42,  # name: an int where a string belongs
        3: None,  # status: NOT NULL
        4: {"not": "a list"},  # capabilities
        5: ["not", "a dict"],  # metadata
        6: "2026-01-02T03:04:05",  # created_at without a time zone
        7: "yesterday",  # not a timestamp
        0: "not-a-uuid",
    }
    for position, value in bad_values.items():
        row = list(good)
        row[position] = value
        with pytest.raises(ValueError):
            codec.from_json(row)


def test_a_task_row_keeps_its_nullable_and_any_columns() -> None:
    codec = RowCodec(Task)
    row: list[Any] = [str(IDENT), None, "t", {}, 5, "pending", {"any": ["json"]}, None, 0, 3]
    row += [None, None, NOW.isoformat(), NOW.isoformat()]
    assert codec.from_json(list(row))[6] == {"any": ["json"]}
    row[4] = True  # a boolean is not a priority
    with pytest.raises(ValueError):
        codec.from_json(list(row))


def test_json_nested_too_deeply_is_refused_without_recursion_error() -> None:
    codec = RowCodec(Agent)
    good = codec.to_json(agent_row())
    nested = list(good)
    nested[5] = {"deep": deep(MAX_JSON_DEPTH + 5)}
    with pytest.raises(ValueError):
        codec.from_json(nested)
    # Deeper than the JSON decoder itself can go.
    text = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError):
        serialization.loads(text)
    with pytest.raises(ValueError):
        codec.loads(text)


def test_a_count_is_an_integer_and_nothing_else() -> None:
    assert SCALAR.from_json(3) == 3
    for bad in ("abc", "3", True, 2.5, None, [3], {"n": 3}):
        with pytest.raises(ValueError):
            SCALAR.from_json(bad)


def test_cached_rows_of_the_wrong_shape_are_refused() -> None:
    codec = RowsCodec(RowCodec(Agent))
    good = [[codec.codec.to_json(agent_row())], None]
    rows, cursor = codec.from_json(json.loads(json.dumps(good)))
    assert cursor is None and rows[0][1] == "a"
    bad: Any
    for bad in ({}, [1], [[], 7], [[[1, 2]], None], "rows", [[{"a": 1}], None]):
        with pytest.raises(ValueError):
            codec.from_json(bad)


# -- L2 reads through a fake Redis -------------------------------------------------------


def row_value(epoch: bytes, payload: Any, generation: int = 10) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return epoch + b":" + str(generation).encode() + b"|" + text.encode()


@pytest.mark.parametrize(
    "payload",
    [
        "\xff garbage",
        {"a": "dict"},
        [1, 2, 3],
        "[" * 50_000,
        "[" * 3000 + "]" * 3000,
        "the row of another agent",
    ],
)
def test_a_corrupt_row_in_l2_is_a_counted_deleted_miss(payload: Any) -> None:
    codec = RowCodec(Agent)
    key = "p:cache:agent:" + str(IDENT)
    if payload == "the row of another agent":
        other = list(codec.to_json(agent_row()))
        other[0] = str(uuid.UUID(int=8))
        payload = other
    l2, client, stats, breaker = l2_with(
        {key: row_value(b"5", payload), "p:cache:epoch:agent": b"5"}
    )
    assert l2.read_row(codec, key, IDENT) is None
    assert stats.corrupt_values == 1 and stats.l2_misses == 1 and stats.l2_hits == 0
    assert key in client.deleted and key not in client.values
    assert breaker.closed


def test_a_good_row_is_read_and_a_later_fill_is_reported_to_a_checked_view() -> None:
    codec = RowCodec(Agent)
    key = "p:cache:agent:" + str(IDENT)
    values = {
        key: row_value(b"5", codec.to_json(agent_row()), generation=11),
        "p:cache:epoch:agent": b"5",
    }
    l2, _, stats, _ = l2_with(values)
    assert l2.read_row(codec, key, IDENT) == agent_row()
    assert l2.read_row(codec, key, IDENT, fence=11) == agent_row()
    assert l2.read_row(codec, key, IDENT, fence=12) == agent_row()  # filled before the fence
    assert l2.read_row(codec, key, IDENT, fence=10) is MOVED  # filled after it
    # A value of the format before generations were stamped: not for a checked view.
    values[key] = b"5|" + json.dumps(codec.to_json(agent_row())).encode()
    l2, _, stats, _ = l2_with(values)
    assert l2.read_row(codec, key, IDENT) == agent_row()
    assert l2.read_row(codec, key, IDENT, fence=11) is None
    assert stats.corrupt_values == 0


@pytest.mark.parametrize("payload", [b'"abc"', b"true", b"1.5", b"[1]", b"{", b"\x00\xff"])
def test_a_count_that_is_not_an_integer_is_a_miss(payload: bytes) -> None:
    l2, client, stats, _ = l2_with({"p:cache:query:agent:1:h": payload})
    assert l2.read_value("p:cache:query:agent:1:h", SCALAR) is NO_VALUE
    assert stats.corrupt_values == 1 and client.deleted == ["p:cache:query:agent:1:h"]


def test_a_command_error_is_a_miss_and_leaves_the_breaker_closed() -> None:
    codec = RowCodec(Agent)
    l2, client, _, breaker = l2_with({})
    client.fail = ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
    assert l2.read_row(codec, "p:cache:agent:x", IDENT) is None
    assert l2.read_value("p:cache:query:agent:1:h", SCALAR) is NO_VALUE
    assert breaker.closed and breaker.command_errors == 2 and breaker.opened == 0
    client.fail = RedisConnectionError("gone")
    assert l2.read_value("p:cache:query:agent:1:h", SCALAR) is NO_VALUE
    assert breaker.state == "open" and breaker.opened == 1


def test_breaker_execute_raises_command_error_for_refusals_only() -> None:
    breaker = CircuitBreaker(probe_interval=3600)

    def refused() -> str:
        raise ResponseError("ERR invalid expire time in 'set' command")

    with pytest.raises(CommandError):
        breaker.execute(refused)
    assert breaker.closed and breaker.command_errors == 1
    assert breaker.call(refused, "default") == "default"
    assert breaker.closed and breaker.command_errors == 2


# -- the dogpile L2 backend ----------------------------------------------------------------


def backend(client: FakeRedis, corrupt: list[str]) -> RedisBackend:
    return RedisBackend(
        {
            "client": client,
            "breaker": CircuitBreaker(probe_interval=3600),
            "on_corrupt": corrupt.append,
        }
    )


def test_the_dogpile_backend_hands_dogpile_only_its_own_format() -> None:
    good = b'{"ct": 1.5, "v": 2}|"payload"'
    client = FakeRedis({"good": good, "bad": b"garbage", "meta": b'{"ct": "x"}|1', "nest": b"[[[["})
    corrupt: list[str] = []
    b = backend(client, corrupt)
    assert b.get_serialized("good") == good
    assert b.get_serialized("bad") is NO_VALUE
    assert b.get_serialized_multi(["meta", "nest", "good", "missing"]) == [
        NO_VALUE,
        NO_VALUE,
        good,
        NO_VALUE,
    ]
    assert sorted(corrupt) == ["bad", "meta", "nest"]
    assert sorted(client.deleted) == ["bad", "meta", "nest"]


def test_delete_multi_of_nothing_sends_nothing() -> None:
    client = FakeRedis()
    b = backend(client, [])
    b.delete_multi(k for k in cast("tuple[str, ...]", ()))
    b.delete_multi([])
    assert client.deleted == [] and b.breaker.closed and b.breaker.command_errors == 0
    b.delete_multi(k for k in ("a", "b"))
    assert client.deleted == ["a", "b"]


# -- the L1 expiry race ----------------------------------------------------------------


def test_an_expired_l1_entry_is_dropped_under_the_lock() -> None:
    """A set() that lands while get() finds the old entry expired is kept."""
    l1 = LRUBackend({"ttl": 10.0})
    now = [100.0]
    l1._clock = lambda: now[0]
    l1.set("k", "old")
    now[0] = 200.0  # expired
    setter_done = threading.Event()

    def setter() -> None:
        l1.set("k", "fresh")
        setter_done.set()

    checking = [True]

    def clock_that_races() -> float:
        # Called by get() when it checks the deadline: a concurrent set()
        # now either completes first (the bug) or waits for the lock.
        if checking[0]:
            checking[0] = False
            thread = threading.Thread(target=setter)
            thread.start()
            setter_done.wait(0.2)
        return now[0]

    l1._clock = clock_that_races
    assert l1.get("k") is NO_VALUE
    assert setter_done.wait(5)
    assert l1.get("k") == "fresh"


# -- the stats cache -----------------------------------------------------------------------


class FakeAchievements:
    def points_of(self, agent_id: uuid.UUID) -> int:
        return 42

    def leaderboard(self, limit: int) -> list[tuple[uuid.UUID, str, int]]:
        return [(IDENT, "a", 42)]


class FakeUnitOfWork:
    achievements = FakeAchievements()


@contextmanager
def reader() -> Iterator[UnitOfWork]:
    yield cast(UnitOfWork, FakeUnitOfWork())


def stats_cache(values: dict[str, Any]) -> tuple[StatsCache, FakeRedis, CircuitBreaker]:
    client = FakeRedis(values)
    breaker = CircuitBreaker(probe_interval=3600)
    cache = StatsCache(redis=cast(Redis, client), breaker=breaker, reader=reader, key_prefix="p:")
    return cache, client, breaker


@pytest.mark.parametrize("value", [b"abc", b"", b"1.5", b"-3", b"\xff", b"9" * 40])
def test_a_corrupt_points_total_is_a_miss(value: bytes) -> None:
    cache, client, breaker = stats_cache({})
    key = cache.agent_key(IDENT)
    client.values[key] = value
    assert cache.points_of(IDENT) == 42
    assert key in client.deleted and cache.corrupt == 1 and breaker.closed


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b'{"a": 1}',
        b'[["not-a-uuid", "a", 1]]',
        b'[["' + str(IDENT).encode() + b'", "a", "many"]]',
        b'[["' + str(IDENT).encode() + b'", 7, 1]]',
        b"[1, 2]",
        b"[" * 50_000,
    ],
)
def test_a_corrupt_leaderboard_is_a_miss(value: bytes) -> None:
    cache, client, breaker = stats_cache({})
    key = cache.leaderboard_key()
    client.values[key] = value
    board = cache.leaderboard()
    assert [(e.agent_id, e.name, e.points) for e in board] == [(IDENT, "a", 42)]
    assert key in client.deleted and cache.corrupt == 1 and breaker.closed


def test_stats_survive_command_errors_with_the_breaker_closed() -> None:
    cache, client, breaker = stats_cache({})
    client.fail = ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
    assert cache.points_of(IDENT) == 42
    assert [e.points for e in cache.leaderboard()] == [42]
    cache.invalidate([IDENT])
    assert breaker.closed and breaker.command_errors >= 3
