"""The session store against real Redis and PostgreSQL: keys, the sliding
TTL, compare-and-set updates under concurrency, regenerate, destroy, restore
from PostgreSQL when Redis lost a session, throttled write-through, purge,
Redis being down, and no raw key ever in PostgreSQL."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

from fixtures.own_servers import OwnRedis
from orchestrator_data import (
    CacheTTLs,
    ConflictError,
    DataLayer,
    NotFoundError,
    SessionConflictError,
    SessionStoreUnavailableError,
    ValidationError,
)
from orchestrator_data.coordination.sessions import SessionStore

DATA: dict[str, Any] = {
    "cart": [1, 2, 3],
    "empty_list": [],
    "empty_object": {},
    "big": 2**62 + 1,  # more digits than Redis' cjson keeps
    "ratio": 0.1,
    "text": 'été 😀 "quoted" / \\',
    "nested": {"a": [{"b": None}]},
}


def store_of(dl: DataLayer) -> SessionStore:
    return dl.session_store


@pytest.fixture
def store(data_layer: DataLayer) -> SessionStore:
    return store_of(data_layer)


@pytest.fixture
def short_store(
    data_layer: DataLayer, make_data_layer: Callable[..., DataLayer]
) -> Callable[[int], SessionStore]:
    """A store whose TTL is ``ttl`` seconds (on the emptied test tables)."""

    def make(ttl: int) -> SessionStore:
        return store_of(make_data_layer(ttls=CacheTTLs(session=ttl), pool_min=1, warm_pool=False))

    return make


def row_of(dl: DataLayer, key: str) -> dict[str, Any] | None:
    digest = hashlib.sha256(key.encode()).hexdigest()
    with dl.engine.connect() as conn:
        row = conn.execute(
            text("SELECT * FROM sessions WHERE session_key = :h"), {"h": digest}
        ).first()
    return None if row is None else dict(row._mapping)


def audit_rows(dl: DataLayer, action: str | None = None) -> list[dict[str, Any]]:
    with dl.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT * FROM audit_logs WHERE resource_type = 'session'"
                " AND (CAST(:a AS text) IS NULL OR action = :a) ORDER BY timestamp"
            ),
            {"a": action},
        )
        return [dict(r._mapping) for r in rows]


def test_create_and_get_round_trip(store: SessionStore, data_layer: DataLayer) -> None:
    before = datetime.now(timezone.utc)
    made = store.create("u-1", DATA, ip="10.0.0.7", user_agent="Mozilla/5.0")
    got = store.get(made.key)
    assert got is not None
    assert got == dataclasses.replace(made, expires_at=got.expires_at)
    assert (got.user_id, got.data, got.version) == ("u-1", DATA, 1)
    assert (got.ip, got.user_agent) == ("10.0.0.7", "Mozilla/5.0")
    assert got.expires_at - before >= timedelta(seconds=3599)
    assert before - timedelta(seconds=5) < got.created_at < datetime.now(timezone.utc)
    assert made.key not in repr(made)
    # The Lua merge moves values as text: nothing about them changes.
    assert store.update(made.key, {"extra": 1}).data == {**DATA, "extra": 1}
    again = store.get(made.key)
    assert again is not None and again.data == {**DATA, "extra": 1}
    row = row_of(data_layer, made.key)
    assert row is not None and row["data"] == {**DATA, "extra": 1} and row["version"] == 2


def test_keys_are_256_random_bits_from_secrets(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int | None] = []
    real = secrets.token_urlsafe

    def spy(nbytes: int | None = None) -> str:
        asked.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(secrets, "token_urlsafe", spy)
    keys = {store.create(f"u-{i}", {}).key for i in range(20)}
    assert len(keys) == 20
    assert asked == [32] * 20
    for key in keys:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)
        assert len(base64.urlsafe_b64decode(key + "=")) == 32


def test_get_and_touch_slide_the_ttl(
    short_store: Callable[[int], SessionStore], data_layer: DataLayer
) -> None:
    store = short_store(2)
    client = data_layer.coordination_redis
    made = store.create("u-1", {"n": 1})
    key = store.redis_key(made.key)
    assert 1800 < client.pttl(key) <= 2000
    time.sleep(0.7)
    assert client.pttl(key) < 1400
    got = store.get(made.key)
    assert got is not None and client.pttl(key) > 1900
    time.sleep(0.7)
    assert client.pttl(key) < 1400
    assert store.touch(made.key)
    assert client.pttl(key) > 1900
    time.sleep(0.7)  # 2.1 s after create: alive because it was used
    assert store.get(made.key) is not None
    time.sleep(2.2)  # idle past the TTL: gone from Redis, and expired in PostgreSQL
    assert client.exists(key) == 0
    assert store.get(made.key) is None
    assert not store.touch(made.key)
    assert not store.touch(secrets.token_urlsafe(32))


def test_two_concurrent_updaters_of_different_fields_both_survive(
    store: SessionStore, data_layer: DataLayer
) -> None:
    made = store.create("u-1", {"keep": True})
    times = 100
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def updater(name: str) -> None:
        start.wait()
        try:
            for i in range(times):
                store.update(made.key, {name: i})
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=updater, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    got = store.get(made.key)
    assert got is not None
    assert got.data == {"keep": True, "a": times - 1, "b": times - 1}
    assert got.version == 1 + 2 * times
    # The durable copy ends at the newest version, whatever order the write-throughs committed in.
    row = row_of(data_layer, made.key)
    assert row is not None and (row["data"], row["version"]) == (got.data, got.version)


def test_a_stale_expected_version_is_refused(store: SessionStore, data_layer: DataLayer) -> None:
    made = store.create("u-1", {"step": 0})
    assert store.update(made.key, {"step": 1}, expected_version=1).version == 2
    with pytest.raises(ConflictError) as caught:
        store.update(made.key, {"step": 99}, expected_version=1)
    assert isinstance(caught.value, SessionConflictError)
    assert (caught.value.expected, caught.value.current) == (1, 2)
    got = store.get(made.key)
    assert got is not None and (got.data, got.version) == ({"step": 1}, 2)
    row = row_of(data_layer, made.key)
    assert row is not None and (row["data"], row["version"]) == ({"step": 1}, 2)
    # None deletes a field; the others stay.
    after = store.update(made.key, {"step": None, "other": "x"}, expected_version=2)
    assert (after.data, after.version) == ({"other": "x"}, 3)


def test_regenerate_moves_the_session_and_kills_the_old_key(
    store: SessionStore, data_layer: DataLayer
) -> None:
    made = store.create("u-1", {"role": "guest"}, ip="10.0.0.7")
    store.update(made.key, {"cart": [1]})
    client = data_layer.coordination_redis
    fresh = store.regenerate(made.key)
    assert fresh.key != made.key
    assert (fresh.data, fresh.version, fresh.user_id, fresh.ip) == (
        {"role": "guest", "cart": [1]},
        2,
        "u-1",
        "10.0.0.7",
    )
    assert fresh.created_at == made.created_at
    assert store.get(made.key) is None
    assert client.exists(store.redis_key(made.key)) == 0
    assert row_of(data_layer, made.key) is None
    with pytest.raises(NotFoundError):
        store.update(made.key, {"x": 1})
    with pytest.raises(NotFoundError):
        store.regenerate(made.key)
    got = store.get(fresh.key)
    assert got is not None and got.data == fresh.data
    # The new key is durable: Redis losing it restores it, and only it.
    client.delete(store.redis_key(fresh.key), store.redis_key(made.key) + ":gone")
    restored = store.get(fresh.key)
    assert restored is not None and (restored.data, restored.version) == (fresh.data, 2)
    assert store.get(made.key) is None


def test_regenerate_loses_no_concurrent_update(store: SessionStore) -> None:
    made = store.create("u-1", {"n": -1})
    last: list[int] = []
    stop = threading.Event()

    def updater() -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            try:
                store.update(made.key, {"n": i})
            except NotFoundError:  # the old key is gone
                return
            last.append(i)

    thread = threading.Thread(target=updater)
    thread.start()
    time.sleep(0.2)
    fresh = store.regenerate(made.key)
    thread.join(30)
    stop.set()
    assert last, "no update ran before the regeneration"
    got = store.get(fresh.key)
    assert got is not None and got.data == {"n": last[-1]}
    assert got.version == 1 + len(last)


def test_a_read_racing_destroy_or_regenerate_does_not_bring_the_old_key_back(
    store: SessionStore, data_layer: DataLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = data_layer.coordination_redis
    for retire in (store.destroy, store.regenerate):
        made = store.create("u-1", {"n": 1})
        client.delete(store.redis_key(made.key))  # Redis lost it: get restores from the row
        read = store._read

        def read_then_retire(
            *args: Any,
            read: Callable[..., Any] = read,
            retire: Callable[[str], object] = retire,
            key: str = made.key,
        ) -> Any:
            found = read(*args)  # the row, read just before it is retired
            monkeypatch.undo()
            retire(key)
            return found

        monkeypatch.setattr(store, "_read", read_then_retire)
        assert store.get(made.key) is None
        assert client.exists(store.redis_key(made.key)) == 0


def test_destroy(store: SessionStore, data_layer: DataLayer) -> None:
    made = store.create("u-1", {"n": 1})
    other = store.create("u-2", {"n": 2})
    assert store.destroy(made.key) is True
    assert store.get(made.key) is None
    assert row_of(data_layer, made.key) is None
    assert data_layer.coordination_redis.exists(store.redis_key(made.key)) == 0
    assert store.destroy(made.key) is False
    with pytest.raises(NotFoundError):
        store.update(made.key, {"n": 3})
    assert store.get(other.key) is not None


def test_restore_after_redis_lost_the_session(store: SessionStore, data_layer: DataLayer) -> None:
    made = store.create("u-1", DATA, ip="2001:db8::1", user_agent="curl/8")
    store.update(made.key, {"step": 1})
    store.update(made.key, {"step": 2})
    client = data_layer.coordination_redis
    key = store.redis_key(made.key)
    client.delete(key)
    got = store.get(made.key)
    assert got is not None
    assert (got.data, got.version) == ({**DATA, "step": 2}, 3)
    assert (got.user_id, got.ip, got.user_agent, got.created_at) == (
        "u-1",
        "2001:db8::1",
        "curl/8",
        made.created_at,
    )
    assert client.pttl(key) > 3590_000  # back in Redis, full TTL
    # An unreadable document is a miss too; so is a lost one on update.
    client.set(key, b"{not json", ex=60)
    got = store.get(made.key)
    assert got is not None and got.version == 3
    client.delete(key)
    assert store.update(made.key, {"step": 3}, expected_version=3).version == 4


def test_expiry_is_written_through_at_most_once_per_tenth_of_the_ttl(
    store: SessionStore, short_store: Callable[[int], SessionStore], data_layer: DataLayer
) -> None:
    # The full TTL: a hundred reads write nothing.
    made = store.create("u-1", {})
    for _ in range(100):
        assert store.get(made.key) is not None
    assert audit_rows(data_layer, "update") == []
    # A 2 s TTL: reads for 1.2 s, one every 10 ms, write the expiry at most every 0.2 s.
    fast = short_store(2)
    quick = fast.create("u-2", {})
    first = row_of(data_layer, quick.key)
    assert first is not None
    started = time.monotonic()
    while time.monotonic() - started < 1.2:
        assert fast.get(quick.key) is not None
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    writes = [r for r in audit_rows(data_layer, "update") if r["resource_id"] == str(first["id"])]
    assert 3 <= len(writes) <= int(elapsed / 0.2) + 1
    assert all(set(w["new_value"]) == {"expires_at"} for w in writes)
    last = row_of(data_layer, quick.key)
    assert last is not None and last["expires_at"] > first["expires_at"] + timedelta(seconds=0.6)


def test_purge_expired_deletes_and_counts(
    store: SessionStore, short_store: Callable[[int], SessionStore], data_layer: DataLayer
) -> None:
    brief = short_store(1)
    gone = [brief.create(f"u-{i}", {"i": i}) for i in range(3)]
    live = store.create("u-live", {})
    assert store.purge_expired() == 0
    time.sleep(1.2)  # past the TTL and the tenth of it that expires_at may lag
    assert brief.purge_expired() == 3
    assert all(row_of(data_layer, s.key) is None for s in gone)
    assert row_of(data_layer, live.key) is not None
    assert len(audit_rows(data_layer, "delete")) == 3
    assert brief.purge_expired() == 0


def test_postgresql_never_holds_a_raw_key(store: SessionStore, data_layer: DataLayer) -> None:
    made = store.create("u-1", {"n": 1}, ip="10.0.0.7")
    store.update(made.key, {"n": 2})
    fresh = store.regenerate(made.key)
    store.get(fresh.key)
    other = store.create("u-2", {})
    store.destroy(other.key)
    keys = [made.key, fresh.key, other.key]
    with data_layer.engine.connect() as conn:
        dump = " ".join(
            str(value)
            for table in ("sessions", "audit_logs")
            for value in conn.execute(text(f"SELECT CAST({table} AS text) FROM {table}")).scalars()
        )
    assert not any(key in dump for key in keys)
    assert hashlib.sha256(fresh.key.encode()).hexdigest() in dump
    assert len(audit_rows(data_layer)) >= 5
    # Nor do Redis key names.
    client = data_layer.coordination_redis
    names = b" ".join(client.scan_iter(match=data_layer.key("{session:*"), count=1000))
    assert not any(key.encode() in names for key in keys)


def test_inputs_are_validated_before_anything_is_sent(
    store: SessionStore, data_layer: DataLayer
) -> None:
    made = store.create("u-1", {})
    almost = made.key[:-1] + "!"
    for bad in (almost, made.key + "A", "", None, 42):
        with pytest.raises(ValidationError) as caught:
            store.get(bad)  # type: ignore[arg-type]
        assert caught.value.fields == ["key"]
        assert made.key[:-1] not in str(caught.value)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"user_id": "x" * 256, "data": {}}, "user_id"),
        ({"user_id": "", "data": {}}, "user_id"),
        ({"user_id": "u", "data": [1]}, "data"),
        ({"user_id": "u", "data": {"n": float("nan")}}, "data"),
        ({"user_id": "u", "data": {"s": "a\x00b"}}, "data"),
        ({"user_id": "u", "data": {}, "ip": "999.1.1.1"}, "ip"),
        ({"user_id": "u", "data": {}, "user_agent": "a\x00"}, "user_agent"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValidationError) as caught:
            store.create(**kwargs)
        assert caught.value.fields == [field]
    with pytest.raises(ValidationError) as caught:
        store.update(made.key, {})
    assert caught.value.fields == ["changes"]
    with pytest.raises(ValidationError) as caught:
        store.update(made.key, {"n": 1}, expected_version=0)
    assert caught.value.fields == ["expected_version"]
    with data_layer.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sessions")).scalar() == 1
    long_agent = store.create("u", {}, user_agent="A" * 5000)
    assert long_agent.user_agent == "A" * 1024


def test_reads_fall_back_to_postgresql_while_redis_is_down(
    data_layer: DataLayer, make_data_layer: Callable[..., DataLayer], own_redis: OwnRedis
) -> None:
    dl = make_data_layer(
        coordination_redis_url=own_redis.url, redis_max_retries=0, pool_min=1, warm_pool=False
    )
    store = store_of(dl)
    made = store.create("u-1", {"n": 1})
    store.update(made.key, {"n": 2})
    own_redis.kill()
    got = store.get(made.key)
    assert got is not None and (got.data, got.version) == ({"n": 2}, 2)
    assert store.touch(made.key)
    writes: list[Callable[[], object]] = [
        lambda: store.update(made.key, {"n": 3}),
        lambda: store.create("u-2", {}),
        lambda: store.regenerate(made.key),
    ]
    for write in writes:
        with pytest.raises(SessionStoreUnavailableError):
            write()
    # Nothing half-done: no row of the failed create, the regenerate undone.
    with dl.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sessions")).scalar() == 1
    still = store.get(made.key)
    assert still is not None and still.data == {"n": 2}
    with pytest.raises(SessionStoreUnavailableError, match="removed from PostgreSQL"):
        store.destroy(made.key)
    assert store.get(made.key) is None
