"""Events against real PostgreSQL and Redis: pub/sub after commit only (never
after a rollback, savepoints included), subscriptions that outlive a Redis
restart and failing handlers, durable streams (each entry handled once per
group, reclaimed from a killed consumer, poison entries dead-lettered), and
the package's own events."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import update

from fixtures.own_servers import OwnRedis
from orchestrator_data import DataLayer, ValidationError
from orchestrator_data.coordination.change_events import (
    ACHIEVEMENT_AWARDED,
    AGENT_STATUS,
    TASK_STATUS,
)
from orchestrator_data.coordination.streams import STREAM_TTL, StreamMessage
from orchestrator_data.models import Agent


@pytest.fixture
def dl(data_layer: DataLayer) -> DataLayer:
    return data_layer


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


class Inbox:
    """What a subscription handler received, in order, with waiting."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, channel: str, payload: Any) -> None:
        with self._cond:
            self.items.append((channel, payload))
            self._cond.notify_all()

    def payloads(self, channel: str | None = None, *, probes: bool = False) -> list[Any]:
        """The payloads received (on ``channel``), without :func:`probe` markers."""
        with self._cond:
            return [
                p
                for c, p in self.items
                if (channel is None or c == channel)
                and (probes or not (isinstance(p, dict) and "probe" in p))
            ]

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(payloads)`` holds, probes included."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.payloads(probes=True)), timeout)


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


def probe(dl: DataLayer, inbox: Inbox, channel: str) -> None:
    """Publish a marker once what was committed has been sent, and wait for
    it: whatever was published before it has been delivered by then."""
    assert dl.events.flush()
    marker = {"probe": uuid.uuid4().hex}
    dl.events.publish(channel, marker)
    assert inbox.wait_for(lambda got: marker in got)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- after commit -----------------------------------------------------------------


def test_published_after_commit_only_and_never_after_a_rollback(
    dl: DataLayer, inbox: Inbox
) -> None:
    channel = unique("orders")
    dropped = dl.events.dropped_on_rollback
    with dl.events.subscribe(channel, inbox) as sub:
        assert sub.wait_subscribed(10)
        with dl.unit_of_work() as uow:
            uow.agents.create(name=unique("a"), role="coder")
            uow.events.publish(channel, {"n": 1})
            probe(dl, inbox, channel)
            assert {"n": 1} not in inbox.payloads()  # queued, not sent
            uow.commit()
            assert inbox.wait_for(lambda got: {"n": 1} in got)
            # After a commit the unit of work goes on in a new transaction.
            uow.events.publish(channel, {"n": 2})
            uow.rollback()
            uow.events.publish(channel, {"n": 3})
            uow.commit()
        with dl.unit_of_work() as uow:
            uow.events.publish(channel, {"n": 4})  # left without commit
        with pytest.raises(RuntimeError), dl.unit_of_work() as uow:
            uow.events.publish(channel, {"n": 5})
            raise RuntimeError("the block fails")
        probe(dl, inbox, channel)
    got = [p["n"] for p in inbox.payloads(channel)]
    assert got == [1, 3]
    assert dl.events.dropped_on_rollback - dropped == 3


def test_savepoints_rolled_back_drop_their_events_and_released_ones_keep_them(
    dl: DataLayer, inbox: Inbox
) -> None:
    channel = unique("steps")
    with dl.events.subscribe(channel, inbox) as sub:
        assert sub.wait_subscribed(10)
        with dl.unit_of_work() as uow:
            uow.events.publish(channel, "outer-1")
            with uow.session.begin_nested():
                uow.events.publish(channel, "released")
                with uow.session.begin_nested():
                    uow.events.publish(channel, "released-inner")
            savepoint = uow.session.begin_nested()
            uow.events.publish(channel, "rolled-back")
            with uow.session.begin_nested():
                uow.events.publish(channel, "inside-rolled-back")
            savepoint.rollback()
            with pytest.raises(ZeroDivisionError), uow.session.begin_nested():
                uow.events.publish(channel, "raised")
                _ = 1 / 0
            uow.events.publish(channel, "outer-2")
            uow.commit()
        probe(dl, inbox, channel)
    assert inbox.payloads(channel) == [
        "outer-1",
        "released",
        "released-inner",
        "outer-2",
    ]


def test_a_hung_redis_holds_up_no_commit(
    make_data_layer: Callable[..., DataLayer], own_redis: OwnRedis, inbox: Inbox
) -> None:
    dl = make_data_layer(coordination_redis_url=own_redis.url, warm_pool=False)
    channel = unique("hung")
    with dl.events.subscribe(channel, inbox) as sub:
        assert sub.wait_subscribed(10)
        own_redis.pause()
        try:
            began = time.monotonic()
            for i in range(3):
                with dl.unit_of_work() as uow:
                    uow.events.publish(channel, i)
                    uow.commit()
            # The sender waits for Redis, the committing code does not.
            assert time.monotonic() - began < 1.0
            assert not dl.events.flush(0.2)
        finally:
            own_redis.resume()
        assert dl.events.flush(10)
        assert inbox.wait_for(lambda got: got == [0, 1, 2])


def test_payloads_and_names_are_checked_when_published(dl: DataLayer) -> None:
    for bad in (object(), float("nan"), {"x": {1, 2}}):
        with pytest.raises(ValidationError) as raised:
            dl.events.publish("fine", bad)
        assert raised.value.fields == ["payload"]
    with pytest.raises(ValidationError):
        dl.events.publish("no{braces}", {})
    with dl.unit_of_work() as uow, pytest.raises(ValidationError):
        uow.events.publish("fine", object())
    # UUIDs and datetimes travel as strings.
    ident = uuid.uuid4()
    assert dl.events.publish(unique("nobody"), {"id": ident}) == 0


# -- subscriptions ----------------------------------------------------------------


def test_a_subscriber_receives_again_after_its_redis_restarts(
    make_data_layer: Callable[..., DataLayer], own_redis: OwnRedis, inbox: Inbox
) -> None:
    dl = make_data_layer(coordination_redis_url=own_redis.url, warm_pool=False)
    channel = unique("restart")
    with dl.events.subscribe(channel, inbox, health_check_interval=0.5) as sub:
        assert sub.wait_subscribed(10)
        dl.events.publish(channel, {"n": 0})
        assert inbox.wait_for(lambda got: {"n": 0} in got)
        own_redis.kill()
        own_redis.start()  # same port, empty
        # At most once: what is published before it is back is lost, so
        # keep publishing until something arrives.
        deadline = time.monotonic() + 15
        n = 0
        while not inbox.wait_for(lambda got: len(got) > 1, timeout=0.1):
            assert time.monotonic() < deadline, "the subscription never came back"
            n += 1
            dl.events.publish(channel, {"n": n})
        assert sub.running and sub.reconnects >= 1
        # And it goes on normally.
        dl.events.publish(channel, {"n": "after"})
        assert inbox.wait_for(lambda got: {"n": "after"} in got)


def test_a_subscriber_whose_redis_hangs_notices_and_comes_back(
    make_data_layer: Callable[..., DataLayer], own_redis: OwnRedis, inbox: Inbox
) -> None:
    dl = make_data_layer(coordination_redis_url=own_redis.url, warm_pool=False)
    channel = unique("hang")
    with dl.events.subscribe(channel, inbox, health_check_interval=0.3) as sub:
        assert sub.wait_subscribed(10)
        own_redis.pause()  # SIGSTOP: the connection stays open, nothing answers
        try:
            # Its PING goes unanswered: it gives the connection up.
            assert wait_until(lambda: not sub.subscribed, timeout=5)
        finally:
            own_redis.resume()
        assert sub.wait_subscribed(15)
        dl.events.publish(channel, "back")
        assert inbox.wait_for(lambda got: "back" in got)
        assert sub.reconnects >= 1


def test_handler_errors_and_malformed_messages_never_stop_a_subscription(
    dl: DataLayer, inbox: Inbox
) -> None:
    channel = unique("fragile")

    def handler(name: str, payload: Any) -> None:
        if payload == "boom":
            raise ValueError("the handler fails")
        inbox(name, payload)

    with dl.events.subscribe([channel, unique("other")], handler) as sub:
        assert sub.wait_subscribed(10)
        dl.events.publish(channel, "boom")
        dl.coordination_redis.publish(dl.events.channel_key(channel), b"\xffnot json")
        dl.events.publish(channel, "boom")
        dl.events.publish(channel, "fine")
        assert inbox.wait_for(lambda got: "fine" in got)
        assert (sub.errors, sub.malformed, sub.received) == (2, 1, 3)
        assert sub.running
    assert not sub.running
    assert inbox.items == [(channel, "fine")]


# -- streams ----------------------------------------------------------------------


def test_each_entry_is_handled_once_by_a_group_and_acknowledged(dl: DataLayer) -> None:
    name, group = unique("jobs"), "workers"
    stream = dl.events.stream(name)
    added = [stream.add({"job": i}) for i in range(30)]
    seen: list[tuple[str, str, int]] = []
    lock = threading.Lock()

    def handler(who: str) -> Callable[[StreamMessage], None]:
        def handle(message: StreamMessage) -> None:
            with lock:
                seen.append((who, message.id, message.payload["job"]))

        return handle

    workers = [
        dl.events.consume(name, group, who, handler(who), claim_idle=5) for who in ("w1", "w2")
    ]
    try:
        assert wait_until(lambda: len(seen) >= 30)
        time.sleep(0.3)  # nothing more comes
    finally:
        for worker in workers:
            worker.stop()  # both at once, then wait for each
        for worker in workers:
            worker.close()
    assert not any(w.running for w in workers)
    assert sorted(i for _, i, _ in seen) == sorted(added)  # each once, none twice
    assert sorted(job for *_, job in seen) == list(range(30))
    assert sum(w.handled for w in workers) == 30
    assert stream.pending(group) == 0
    ttl = dl.coordination_redis.ttl(stream.key)
    assert 0 < ttl <= STREAM_TTL


def test_a_consumer_goes_on_after_its_redis_restarts_empty(
    make_data_layer: Callable[..., DataLayer], own_redis: OwnRedis
) -> None:
    dl = make_data_layer(coordination_redis_url=own_redis.url, warm_pool=False)
    name = unique("restart")
    seen: list[Any] = []
    worker = dl.events.consume(name, "g", "w", lambda m: seen.append(m.payload), claim_idle=1)
    try:
        dl.events.stream(name).add("before")
        assert wait_until(lambda: seen == ["before"])
        own_redis.kill()
        own_redis.start()  # the stream and its group are gone
        dl.events.stream(name).add("after")  # before the group exists again
        # The group is created again from the start of what the stream holds.
        assert wait_until(lambda: seen == ["before", "after"])
        assert worker.running
    finally:
        worker.close()


def test_a_stream_is_capped_with_approximate_trimming(dl: DataLayer) -> None:
    stream = dl.events.stream(unique("capped"), maxlen=10)
    for i in range(300):
        stream.add(i)
    # MAXLEN ~ trims whole macro nodes (100 entries by default): about 10 left.
    assert 10 <= stream.length() <= 110


def test_an_entry_held_by_a_killed_consumer_is_reclaimed_and_handled_once(
    dl: DataLayer,
) -> None:
    name, group = unique("handoff"), "workers"
    code = "from fixtures.events import stuck_consumer; stuck_consumer()"
    args = [dl.settings.effective_coordination_redis_url, dl.settings.key_prefix, name, group]
    child = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args), "doomed"],
        stdout=subprocess.PIPE,
        text=True,
    )
    with child:
        assert child.stdout is not None
        assert json.loads(child.stdout.readline()) == {"ready": True}
        entry = dl.events.stream(name).add({"order": 7})
        assert json.loads(child.stdout.readline()) == {"got": entry, "payload": {"order": 7}}
        child.send_signal(signal.SIGKILL)  # read, never acknowledged
        child.wait(30)
    handled: list[StreamMessage] = []
    survivor = dl.events.consume(
        name, group, "survivor", handled.append, claim_idle=0.5, start=False
    )
    deadline = time.monotonic() + 10
    while not handled and time.monotonic() < deadline:
        survivor.run_once(block=0.1)
    assert [(m.id, m.payload, m.deliveries) for m in handled] == [(entry, {"order": 7}, 2)]
    assert survivor.reclaimed == 1
    # Acknowledged: never handed out again, by a claim or a read.
    time.sleep(0.6)
    for _ in range(3):
        survivor.run_once(block=0.05)
    assert len(handled) == 1
    assert dl.events.stream(name).pending(group) == 0


def test_a_poison_entry_lands_in_the_dead_letters_after_max_deliveries(dl: DataLayer) -> None:
    name, group = unique("poison"), "workers"
    stream = dl.events.stream(name)
    poison = stream.add({"kind": "poison"})
    calls: list[int] = []
    fine: list[Any] = []

    def handler(message: StreamMessage) -> None:
        if message.payload == {"kind": "poison"}:
            calls.append(message.deliveries)
            raise RuntimeError("cannot handle this one")
        fine.append(message.payload)

    worker = dl.events.consume(name, group, "w", handler, max_deliveries=3, claim_idle=0.1)
    try:
        assert wait_until(lambda: bool(stream.dead_letters()))
        good = stream.add({"kind": "fine"})
        # Not JSON: dead at once, whatever max_deliveries says.
        dl.coordination_redis.xadd(stream.key, {"payload": b"{not json"})
        assert wait_until(lambda: len(stream.dead_letters()) == 2 and bool(fine))
    finally:
        worker.close()
    assert calls == [1, 2, 3]
    first, malformed = stream.dead_letters()
    assert (first.original_id, first.payload, first.deliveries) == (poison, {"kind": "poison"}, 3)
    assert (first.group, first.consumer) == (group, "w")
    assert "RuntimeError: cannot handle this one" in first.error
    assert malformed.payload is None and "malformed" in malformed.error
    assert fine == [{"kind": "fine"}] and good
    assert stream.pending(group) == 0
    assert worker.dead_lettered == 2 and worker.failed == 3
    assert 0 < dl.coordination_redis.ttl(stream.dead_key) <= STREAM_TTL


# -- the package's own events --------------------------------------------------------


@pytest.fixture
def own_events(dl: DataLayer, inbox: Inbox) -> Iterator[Inbox]:
    with dl.events.subscribe([AGENT_STATUS, TASK_STATUS, ACHIEVEMENT_AWARDED], inbox) as sub:
        assert sub.wait_subscribed(10)
        yield inbox


def test_an_agent_status_change_publishes_agent_status_after_commit(
    dl: DataLayer, own_events: Inbox
) -> None:
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name=unique("agent"), role="coder")
        uow.commit()
    with dl.unit_of_work() as uow:
        uow.agents.update(agent.id, status="busy")
        probe(dl, own_events, AGENT_STATUS)
        assert {"agent_id": str(agent.id), "old": "idle", "new": "busy"} not in (
            own_events.payloads(AGENT_STATUS)
        )
        uow.commit()
    with dl.unit_of_work() as uow:
        uow.agents.update(agent.id, status="error")  # rolled back: no event
    with dl.unit_of_work() as uow:
        # A bulk statement through the session counts too.
        uow.session.execute(update(Agent).where(Agent.id == agent.id).values(status="offline"))
        task = uow.tasks.create(type="t", payload={}, agent_id=agent.id)
        uow.tasks.update(task.id, status="assigned")
        award = uow.achievements.create(agent_id=agent.id, achievement_type="first", points=5)
        uow.commit()
    probe(dl, own_events, AGENT_STATUS)
    ident = str(agent.id)
    assert own_events.payloads(AGENT_STATUS)[:3] == [
        {"agent_id": ident, "old": None, "new": "idle"},
        {"agent_id": ident, "old": "idle", "new": "busy"},
        {"agent_id": ident, "old": "busy", "new": "offline"},
    ]
    assert own_events.payloads(TASK_STATUS) == [
        {"task_id": str(task.id), "old": None, "new": "pending"},
        {"task_id": str(task.id), "old": "pending", "new": "assigned"},
    ]
    assert own_events.payloads(ACHIEVEMENT_AWARDED) == [
        {"achievement_id": str(award.id), "agent_id": ident, "type": "first", "points": 5}
    ]
