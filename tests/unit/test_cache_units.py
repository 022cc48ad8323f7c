"""Cache pieces that need no server: row codec, keys, invalidation targets,
circuit breaker."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import inspect

from orchestrator_data.cache.breaker import CircuitBreaker, Unavailable
from orchestrator_data.cache.invalidation import targets
from orchestrator_data.cache.keys import Keys, digest
from orchestrator_data.cache.serialization import RowCodec, copy_json
from orchestrator_data.models import Agent, Session, Task

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def agent() -> Agent:
    return Agent(
        id=uuid.uuid4(),
        name="a",
        role="r",
        status="idle",
        capabilities=["plan", {"nested": [1]}],
        metadata_={"tier": 1, "tags": ["x"]},
        created_at=NOW,
        updated_at=NOW,
    )


def test_rows_round_trip_through_json_and_hydrate_detached() -> None:
    codec = RowCodec(Agent)
    original = agent()
    row = codec.from_instance(original)
    text = codec.dumps(row)
    assert "pickle" not in text and text.startswith("[")
    again = codec.loads(text)
    assert again == row
    obj = codec.hydrate(again)
    assert isinstance(obj, Agent)
    assert (obj.id, obj.name, obj.capabilities, obj.metadata_, obj.created_at) == (
        original.id,
        "a",
        ["plan", {"nested": [1]}],
        {"tier": 1, "tags": ["x"]},
        NOW,
    )
    state = inspect(obj)
    assert state.detached and state.identity == (original.id,)
    assert not state.unloaded


def test_hydrated_objects_never_share_json_values() -> None:
    codec = RowCodec(Agent)
    row = codec.from_instance(agent())
    first, second = codec.hydrate(row), codec.hydrate(row)
    first.metadata_["tags"].append("changed")
    first.capabilities[1]["nested"].append(2)
    assert second.metadata_ == {"tier": 1, "tags": ["x"]}
    assert codec.hydrate(row).capabilities == ["plan", {"nested": [1]}]


@pytest.mark.parametrize("model", [Agent, Task, Session])
def test_every_cached_model_has_a_codec(model: type) -> None:
    codec: RowCodec[Agent] = RowCodec(model)
    assert "id" in codec.keys


def test_malformed_l2_values_are_rejected() -> None:
    codec = RowCodec(Agent)
    for bad in (b"{}", b"[1, 2]", b"not json", b'["x","a","r","idle",[],{},"t","t"]'):
        with pytest.raises(ValueError):
            codec.loads(bad)


def test_copy_json_is_deep() -> None:
    value = {"a": [1, {"b": [2]}]}
    copied = copy_json(value)
    assert copied == value
    copied["a"][1]["b"].append(3)
    assert value == {"a": [1, {"b": [2]}]}


def test_keys_follow_the_design() -> None:
    k = Keys("p:")
    ident = uuid.UUID(int=1)
    assert k.entity("agent", ident) == f"p:cache:agent:{ident}"
    assert k.entity("task", ident) == f"p:cache:task:{ident}"
    assert k.entity("session", ident) == f"p:cache:session:{ident}"
    assert k.query("agent", 7, "abc") == "p:cache:query:agent:7:abc"
    assert digest("list", {"b": 1, "a": 2}) == digest("list", {"a": 2, "b": 1})
    assert digest("list", {"a": 1}) != digest("list", {"a": 2})


def test_invalidation_targets_and_cascades() -> None:
    a, t = uuid.uuid4(), uuid.uuid4()
    out = targets([("task", t, "update")])
    assert out.rows == {("task", t)} and out.generations == {"task"} and not out.epochs
    out = targets([("agent", a, "delete")])
    assert out.generations == {"agent", "task", "achievement"}
    assert out.epochs == {"task"}
    out = targets([("achievement", uuid.uuid4(), "create")])
    assert not out.rows and out.generations == {"achievement"}
    assert targets([("agent", None, "update")]).epochs == {"agent"}


def test_breaker_opens_on_a_redis_error_and_skips_calls() -> None:
    breaker = CircuitBreaker(probe_interval=3600)
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise RedisConnectionError("down")

    assert breaker.call(failing, None) is None
    assert breaker.state == "open"
    assert breaker.call(lambda: calls.append(2), None) is None
    assert calls == [1]
    with pytest.raises(Unavailable):
        breaker.execute(lambda: 1)


def test_breaker_without_probe_is_half_open_after_the_interval() -> None:
    breaker = CircuitBreaker(probe_interval=0.0)
    breaker.trip("test")
    assert breaker.call(lambda: 5, 0) == 5
    assert breaker.state == "closed"


def test_breaker_with_probe_recovers_by_itself() -> None:
    recovered: list[int] = []
    breaker = CircuitBreaker(
        probe=lambda: None, on_recover=lambda: recovered.append(1), probe_interval=0.01
    )
    breaker.trip("test")
    import time

    deadline = time.monotonic() + 10
    while breaker.state != "closed" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert breaker.state == "closed" and recovered == [1]
    breaker.stop()
