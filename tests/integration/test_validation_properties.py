"""Property: whatever the input, a repository call succeeds or raises one of
the package's errors (a ValidationError for bad input), and a refused call
sends no write and leaves every table's row count unchanged.

Inputs cover every repository's ``create``, ``update`` and ``list``:
arbitrary text (NUL and lone surrogates included), arbitrary JSON (deep
nesting included), integers of any size, datetimes naive and aware in any
zone, values of the wrong type, forged and misplaced cursors. Each example
draws a mode: all values valid (the call must then succeed, unless the
database finds a conflict or the row is missing), one value arbitrary (a
definitely bad one must be named), or all arbitrary.
"""

from __future__ import annotations

import ipaddress
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text

from orchestrator_data import (
    Actor,
    ConflictError,
    DataLayer,
    NotFoundError,
    OrchestratorDataError,
    UnitOfWork,
    ValidationError,
)
from orchestrator_data.models import AGENT_STATUSES, AUDIT_ACTIONS, RESOURCE_TYPES, TASK_STATUSES
from orchestrator_data.pagination import encode_cursor
from orchestrator_data.schemas import rules

TABLES = ("agents", "tasks", "sessions", "achievements", "audit_logs")
COUNTS = text("SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES))
WRITES = ("INSERT", "UPDATE", "DELETE")

PROPERTY = settings(
    max_examples=500,
    deadline=None,
    database=None,  # nothing written to .hypothesis/ in the source tree
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# -- values ---------------------------------------------------------------------------------

UNSTORABLE_CHARS = ("\x00", "\ud800", "\udbff", "\udc00", "\udfff")
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
storable_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12
)
unstorable_text = st.builds(
    lambda a, bad, b: a + bad + b, any_text, st.sampled_from(UNSTORABLE_CHARS), any_text
)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


valid_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(rules.JSON_INT_MIN, rules.JSON_INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | storable_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(storable_text, inner, max_size=3),
    max_leaves=8,
)
valid_object = st.dictionaries(storable_text, valid_json, max_size=4)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)
deep_json = st.integers(rules.MAX_JSON_DEPTH - 2, rules.MAX_JSON_DEPTH + 50).map(nested)
huge_ints = st.sampled_from([2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1])
huge_ints |= st.integers(min_value=2**31) | st.just(10**4000)

offsets = st.timedeltas(
    min_value=timedelta(hours=-23, minutes=59), max_value=timedelta(hours=23, minutes=59)
).map(timezone)
aware_zones = st.just(timezone.utc) | st.timezones() | offsets
valid_datetimes = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=aware_zones
)
any_datetimes = st.datetimes(timezones=st.none() | aware_zones)


class Opaque:
    """A value of a type nothing accepts."""


wrong_types = st.sampled_from(
    [Opaque(), b"bytes", bytearray(b"b"), complex(1, 2), Decimal("1.5"), Ellipsis, print]
)
anything = st.one_of(
    any_text,
    unstorable_text,
    st.integers(),
    huge_ints,
    st.floats(),
    st.booleans(),
    st.none(),
    any_json,
    deep_json,
    any_datetimes,
    st.dates(),
    st.uuids(),
    st.uuids().map(str),
    wrong_types,
    st.frozensets(st.integers(), max_size=2),
)


def either(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` or ``other``, half the time each (``|`` would flatten ``other``'s
    many alternatives and make ``valid`` rare)."""
    return st.booleans().flatmap(lambda pick: valid if pick else other)


def definitely_bad(value: Any, depth: int = 0) -> bool:
    """True for a value no field, filter or argument accepts: unstorable text,
    integers beyond 64 bits, NaN and infinities, naive datetimes, dates,
    bytes, objects of other types, and containers holding one of these or
    nested beyond the JSON limit."""
    if isinstance(value, str):
        return any(c in value for c in UNSTORABLE_CHARS)
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int):
        return not rules.JSON_INT_MIN <= value <= rules.JSON_INT_MAX
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, datetime):
        return value.tzinfo is None
    if isinstance(value, (list, tuple, dict)):
        if depth >= rules.MAX_JSON_DEPTH:
            return True
        if isinstance(value, dict):
            return any(
                not isinstance(k, str) or definitely_bad(k) or definitely_bad(v, depth + 1)
                for k, v in value.items()
            )
        return any(definitely_bad(v, depth + 1) for v in value)
    # Dates, bytes, Decimals, complex numbers, Opaque: nothing takes them.
    return not isinstance(
        value, (uuid.UUID, frozenset, ipaddress.IPv4Address, ipaddress.IPv6Address)
    )


# -- what each repository takes ------------------------------------------------------------------


def name_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=max_size,
    )


class Baseline:
    """Committed rows every example can update, refer to and page through."""

    def __init__(self, dl: DataLayer) -> None:
        with dl.unit_of_work(actor=Actor("service", "property-test", "10.0.0.1")) as uow:
            agents = [uow.agents.create(name=f"base-{i}", role="base") for i in range(3)]
            tasks = [
                uow.tasks.create(type="base", payload={"i": i}, priority=i + 1, agent_id=a.id)
                for i, a in enumerate(agents)
            ]
            sessions = [
                uow.sessions.create(session_key=f"base-{i}", expires_at=expires)
                for i, expires in enumerate([None, datetime.now(timezone.utc), None])
            ]
            achievements = [
                uow.achievements.create(agent_id=a.id, achievement_type="base", points=1)
                for a in agents
            ]
            uow.commit()
        self.agent_ids = [a.id for a in agents]
        self.ids: dict[str, list[uuid.UUID]] = {
            "agents": self.agent_ids,
            "tasks": [t.id for t in tasks],
            "sessions": [s.id for s in sessions],
            "achievements": [a.id for a in achievements],
            "audit": [],
        }
        self.cursors: dict[tuple[str, str], list[str]] = {}
        with dl.unit_of_work(read_only=True) as uow:
            for repo_name, orders in SORTABLE.items():
                repo = getattr(uow, repo_name)
                for order in orders:
                    found = self.cursors.setdefault((repo_name, order), [])
                    for descending in (False, True):
                        page = repo.list(limit=1, order_by=order, descending=descending)
                        if page.next_cursor is not None:
                            found.append(page.next_cursor)


SORTABLE = {
    "agents": ["created_at", "name", "updated_at"],
    "tasks": ["created_at", "priority", "updated_at"],
    "sessions": ["created_at", "expires_at", "updated_at"],
    "achievements": ["created_at", "points", "completed_at"],
    "audit": ["timestamp"],
}


def create_fields(base: Baseline) -> dict[str, dict[str, st.SearchStrategy[Any]]]:
    """Valid values of each repository's fields (for create and update)."""
    agent_ids = st.sampled_from(base.agent_ids)
    return {
        "agents": {
            "name": name_text(255),
            "role": name_text(100),
            "status": st.sampled_from(AGENT_STATUSES),
            "capabilities": st.lists(name_text(255), max_size=3),
            "metadata": valid_object,
        },
        "tasks": {
            "agent_id": st.none() | agent_ids | st.uuids(),
            "type": name_text(100),
            "payload": valid_object,
            "priority": st.integers(1, 10),
            "status": st.sampled_from(TASK_STATUSES),
            "result": valid_json,
            "error_message": st.none() | storable_text,
            "retry_count": st.integers(0, rules.INTEGER[1]),
            "max_retries": st.integers(0, rules.INTEGER[1]),
            "started_at": st.none() | valid_datetimes,
            "completed_at": st.none() | valid_datetimes,
        },
        "sessions": {
            "session_key": name_text(255),
            "user_id": st.none() | name_text(255),
            "data": valid_object,
            "ip_address": st.none() | st.ip_addresses().map(str),
            "user_agent": st.none() | storable_text,
            "expires_at": st.none() | valid_datetimes,
        },
        "achievements": {
            "agent_id": agent_ids,
            "achievement_type": name_text(100),
            "points": st.integers(0, rules.INTEGER[1]),
            "completed_at": valid_datetimes,
            "metadata": valid_object,
        },
        "audit": {"action": st.sampled_from(AUDIT_ACTIONS)},
    }


REQUIRED = {
    "agents": {"name", "role"},
    "tasks": {"type", "payload"},
    "sessions": {"session_key"},
    "achievements": {"agent_id", "achievement_type"},
    "audit": set(),
}


def filters(base: Baseline) -> dict[str, dict[str, st.SearchStrategy[Any]]]:
    """Valid values of each repository's filters."""
    created = {"created_after": valid_datetimes, "created_before": valid_datetimes}
    return {
        "agents": {
            "role": name_text(100),
            "status": st.sampled_from(AGENT_STATUSES),
            "capability": name_text(255) | st.lists(name_text(255), max_size=2),
            "name": name_text(255),
            **created,
        },
        "tasks": {
            "status": st.sampled_from(TASK_STATUSES)
            | st.lists(st.sampled_from(TASK_STATUSES), max_size=3),
            "type": name_text(100),
            "agent_id": st.sampled_from(base.agent_ids) | st.uuids().map(str),
            "priority_min": st.integers(1, 10),
            "priority_max": st.integers(1, 10),
            **created,
        },
        "sessions": {"user_id": name_text(255), "expired": st.booleans(), **created},
        "achievements": {
            "agent_id": st.sampled_from(base.agent_ids),
            "achievement_type": name_text(100),
            **created,
        },
        "audit": {
            "resource_type": st.sampled_from(RESOURCE_TYPES),
            "resource_id": st.uuids() | name_text(255),
            "actor_type": name_text(50),
            "actor_id": name_text(255),
            "action": st.sampled_from(AUDIT_ACTIONS),
            "since": valid_datetimes,
            "until": valid_datetimes,
            "txid": st.integers(1, 2**63 - 1),
            "correlation_id": name_text(255),
        },
    }


# -- the property ----------------------------------------------------------------------


class Writes:
    """The write statements sent to PostgreSQL while recording."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.recording = False

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.recording and statement.lstrip().upper().startswith(WRITES):
            self.sent.append(statement)

    def start(self) -> None:
        self.sent.clear()
        self.recording = True

    def stop(self) -> None:
        self.recording = False


@pytest.fixture
def baseline(data_layer: DataLayer) -> Baseline:
    return Baseline(data_layer)


@pytest.fixture
def writes(data_layer: DataLayer) -> Iterator[Writes]:
    recorder = Writes()
    event.listen(data_layer.engine, "before_cursor_execute", recorder)
    yield recorder
    event.remove(data_layer.engine, "before_cursor_execute", recorder)


def counts(uow: UnitOfWork) -> tuple[int, ...]:
    return tuple(uow.session.execute(COUNTS).one())


def draw_values(
    data: st.DataObject,
    valid: dict[str, st.SearchStrategy[Any]],
    names: list[str],
    mode: str,
) -> dict[str, Any]:
    """Values for ``names``: valid ones, one arbitrary, or all arbitrary (``mode``)."""
    arbitrary = data.draw(st.sampled_from(names)) if mode == "one bad" and names else None
    values: dict[str, Any] = {}
    for name in names:
        if mode == "mixed" or name == arbitrary or name not in valid:
            values[name] = data.draw(
                st.one_of(valid[name], anything) if name in valid else anything
            )
        else:
            values[name] = data.draw(valid[name])
    return values


def call_args(
    data: st.DataObject, base: Baseline, repo_name: str, op: str, mode: str
) -> tuple[list[Any], dict[str, Any]]:
    if op in ("create", "update"):
        valid = create_fields(base)[repo_name]
        chosen = data.draw(st.sets(st.sampled_from(sorted(valid)), max_size=len(valid)))
        if op == "create" and mode != "mixed":
            chosen |= REQUIRED[repo_name]
        if mode == "mixed":
            chosen |= data.draw(st.sets(st.sampled_from(["id", "created_at", "colour"])))
        kwargs = draw_values(data, valid, sorted(chosen), mode)
        if op == "create":
            return [], kwargs
        ids = base.ids[repo_name]
        ident_strategy = st.sampled_from(ids) if ids else st.uuids()
        ident = data.draw(ident_strategy if mode != "mixed" else ident_strategy | anything)
        return [ident], kwargs
    valid = filters(base)[repo_name]
    orders = SORTABLE[repo_name]
    paging: dict[str, st.SearchStrategy[Any]] = {
        "limit": st.integers(1, 1000),
        "order_by": st.sampled_from(orders),
        "descending": st.booleans(),
        "cached": st.none() | st.booleans(),
    }
    chosen = data.draw(st.sets(st.sampled_from(sorted(valid) + sorted(paging)), max_size=4))
    if mode == "mixed":
        chosen |= data.draw(st.sets(st.just("colour")))
    kwargs = draw_values(data, {**valid, **paging}, sorted(chosen), mode)
    order = kwargs.get("order_by", orders[0])
    pool = base.cursors.get((repo_name, order), []) if isinstance(order, str) else []
    from_pool: bool = data.draw(st.booleans())
    if pool and from_pool:
        kwargs["after"] = data.draw(st.sampled_from(pool))
    elif mode == "mixed" and data.draw(st.booleans()):
        forged = st.builds(encode_cursor, anything.filter(_encodable), st.uuids())
        kwargs["after"] = data.draw(forged | any_text | anything)
    return [], kwargs


def _encodable(value: Any) -> bool:
    try:
        encode_cursor(value, uuid.uuid4())
    except (TypeError, ValueError):
        return False
    return True


@PROPERTY
@given(data=st.data())
def test_every_call_succeeds_or_raises_a_package_error_and_a_refusal_writes_nothing(
    data_layer: DataLayer, baseline: Baseline, writes: Writes, data: st.DataObject
) -> None:
    base = baseline
    repo_name = data.draw(st.sampled_from(sorted(SORTABLE)))
    op = data.draw(st.sampled_from(["create", "update", "list"]))
    mode = data.draw(st.sampled_from(["valid", "one bad", "mixed"]))
    args, kwargs = call_args(data, base, repo_name, op, mode)
    bad = sorted(k for k, v in kwargs.items() if definitely_bad(v))
    if args and definitely_bad(args[0]):
        bad.append("id")

    with data_layer.unit_of_work() as uow:
        before = counts(uow)
        method: Callable[..., Any] = getattr(getattr(uow, repo_name), op)
        writes.start()
        try:
            result = method(*args, **kwargs)
        except ConflictError:
            hypothesis.event(f"{op} {mode}: ConflictError")
            # The database refused the write (a duplicate, a missing agent):
            # never for input the rules call bad.
            assert not bad, f"{bad} reached the database"
            return
        except NotFoundError:
            hypothesis.event(f"{op} {mode}: NotFoundError")
            assert not bad
            assert writes.sent == []
            assert counts(uow) == before
            return
        except ValidationError as err:
            hypothesis.event(f"{op} {mode}: ValidationError")
            assert err.fields, err
            if mode == "valid" and repo_name != "audit":
                raise AssertionError(f"valid input refused: {err}") from err
            if mode == "one bad" and bad:
                assert set(bad) & set(err.fields), (bad, err.fields)
            assert writes.sent == [], "a refused call sent a write"
            assert counts(uow) == before  # and the transaction is still usable
            return
        except OrchestratorDataError as err:
            hypothesis.event(f"{op} {mode}: {type(err).__name__}")
            assert repo_name == "audit" and op in ("create", "update"), repr(err)
            assert writes.sent == []
            assert counts(uow) == before
            return
        finally:
            writes.stop()
        hypothesis.event(f"{op} {mode}: ok")
        assert not bad, f"{bad} accepted: {kwargs}"
        assert repo_name != "audit" or op == "list"
        if op == "list":
            if result.next_cursor is not None:  # the cursor it made is accepted back
                kwargs["after"] = result.next_cursor
                method(**kwargs)
        else:
            uow.session.refresh(result)  # what was stored reads back
            getattr(uow, repo_name).dump(result)


ACTOR_FIELDS = {"actor.type", "actor.id", "actor.ip"}
ip_values = either(
    st.one_of(
        st.none(),
        st.ip_addresses().map(str),
        st.ip_addresses(),
        st.builds(
            lambda ip, prefix: f"{ip}/{prefix % (ip.max_prefixlen + 1)}",
            st.ip_addresses(),
            st.integers(0, 128),
        ),
        st.sampled_from(["fe80::1%eth0", "10.0.0.1\x00", "999.0.0.1", "::ffff:1.2.3.4", "1.2.3"]),
    ),
    anything,
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kind=either(name_text(50), anything),
    ident=either(st.none() | name_text(255), anything),
    ip=ip_values,
)
def test_an_actor_is_refused_when_made_or_lands_on_its_audit_rows(
    data_layer: DataLayer, kind: Any, ident: Any, ip: Any
) -> None:
    try:
        actor = Actor(kind, ident, ip)
    except ValidationError as err:
        hypothesis.event("refused: " + ", ".join(err.fields))
        assert err.fields and set(err.fields) <= ACTOR_FIELDS, err.fields
        return
    hypothesis.event("accepted")
    assert not any(definitely_bad(v) for v in (kind, ident, ip))
    with data_layer.unit_of_work(actor=actor) as uow:
        agent = uow.agents.create(name=f"actor-{uuid.uuid4().hex}", role="r")
        (row,) = uow.audit.history("agent", agent.id).items
        assert (row.actor_type, row.actor_id) == (actor.type, actor.id)
        if actor.ip is None or row.ip_address is None:
            assert actor.ip == row.ip_address
        else:
            assert ipaddress.ip_interface(row.ip_address) == ipaddress.ip_interface(actor.ip)


def test_a_non_actor_is_refused_before_a_connection_is_taken(data_layer: DataLayer) -> None:
    checked_out = data_layer.engine.pool.checkedout()  # type: ignore[attr-defined]
    with pytest.raises(ValidationError) as info, data_layer.unit_of_work(actor="alice"):  # type: ignore[arg-type]
        pass
    assert info.value.fields == ["actor"]
    assert data_layer.engine.pool.checkedout() == checked_out  # type: ignore[attr-defined]


def test_keyset_pages_cover_rows_with_null_sort_values(data_layer: DataLayer) -> None:
    # sessions.expires_at is nullable: NULLs sort last ascending, first
    # descending, and a cursor on a NULL is a position like any other.
    with data_layer.unit_of_work() as uow:
        for i in range(7):
            expires = None if i % 2 else datetime(2030, 1, 1 + i % 3, tzinfo=timezone.utc)
            uow.sessions.create(session_key=f"null-{i}", expires_at=expires)
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        everything = {s.id for s in uow.sessions.list(limit=100)}
        for descending in (False, True):
            seen: list[uuid.UUID] = []
            after = None
            while True:
                page = uow.sessions.list(
                    limit=2, order_by="expires_at", descending=descending, after=after
                )
                seen.extend(s.id for s in page)
                if page.next_cursor is None:
                    break
                after = page.next_cursor
            assert len(seen) == len(set(seen)) == len(everything)
            assert set(seen) == everything


def test_the_largest_values_the_rules_accept_are_stored(data_layer: DataLayer) -> None:
    # Each limit is below the one PostgreSQL would enforce with an error:
    # 4-byte characters in a uniquely indexed name and in the per-task award
    # index, a full-text-indexed payload of distinct words at its size limit,
    # JSON at the depth limit (change capture, audit trail and cache recurse).
    astral = "".join(chr(0x20000 + i) for i in range(255))  # CJK Extension B: letters
    words = " ".join(chr(0x20000 + i % 40000) + chr(0x4E00 + i // 40000) for i in range(44_000))
    payload = {"text": words[: rules.MAX_SEARCHABLE_JSON_SIZE - len('{"text":""}')]}
    big = {"blob": "x" * (rules.MAX_JSON_SIZE - len('{"blob":""}'))}
    deep = nested(rules.MAX_JSON_DEPTH)
    with data_layer.unit_of_work(actor=Actor("user", astral[:255], "2001:db8::1")) as uow:
        agent = uow.agents.create(
            name=astral, role=astral[:100], capabilities=[astral], metadata=big
        )
        task = uow.tasks.create(type="big", payload=payload, result=deep, agent_id=agent.id)
        uow.achievements.create(
            agent_id=agent.id, achievement_type="completion_streak", metadata={"task_id": astral}
        )
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.get_or_raise(agent.id).metadata_ == big
        assert uow.tasks.get_or_raise(task.id).result == deep
        assert [t.id for t in uow.tasks.search(words[:2])] == [task.id]
        assert uow.audit.count(resource_id=str(task.id)) == 1
