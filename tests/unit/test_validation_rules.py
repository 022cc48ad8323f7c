"""Bad input is a ValidationError naming the field, raised before anything is
sent: the cases of issue 8, item 5, and their relatives.

No server: the repositories run on a Session bound to nothing, so a call that
got past validation would fail with SQLAlchemy's UnboundExecutionError
instead of the ValidationError these tests expect.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import pytest
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data import Actor, ValidationError, acting_as
from orchestrator_data.actor import ACTOR_ID_MAX_LENGTH, ACTOR_TYPE_MAX_LENGTH
from orchestrator_data.models import AuditLog
from orchestrator_data.pagination import MAX_CURSOR_LENGTH, decode_cursor, encode_cursor
from orchestrator_data.repositories import (
    AchievementRepository,
    AgentRepository,
    AuditLogRepository,
    SessionRepository,
    TaskRepository,
)
from orchestrator_data.schemas import (
    AchievementSchema,
    AgentSchema,
    SessionSchema,
    TaskSchema,
    rules,
)
from orchestrator_data.schemas.base import load

UTC = timezone.utc
MOMENT = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
NUL = "a\x00b"
SURROGATE = "a\ud800b"


def _unbound() -> OrmSession:
    return OrmSession()  # bound to no engine: any SQL raises UnboundExecutionError


def agents() -> AgentRepository:
    return AgentRepository(session=_unbound())


def tasks() -> TaskRepository:
    return TaskRepository(session=_unbound())


def sessions() -> SessionRepository:
    return SessionRepository(session=_unbound())


def achievements() -> AchievementRepository:
    return AchievementRepository(session=_unbound())


def audit() -> AuditLogRepository:
    return AuditLogRepository(session=_unbound())


def fields_of(call: Callable[..., object], *args: Any, **kwargs: Any) -> list[str]:
    """The fields the ValidationError raised by ``call(*args, **kwargs)`` names."""
    with pytest.raises(ValidationError) as info:
        call(*args, **kwargs)
    return info.value.fields


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` levels of objects and arrays around ``leaf``."""
    value = leaf
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


def forged(*parts: Any) -> str:
    raw = json.dumps(list(parts)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# -- text: NUL and lone surrogates -------------------------------------------------------


@pytest.mark.parametrize("bad", [NUL, SURROGATE, "\x00", "\udfff"])
@pytest.mark.parametrize(
    ("make", "field", "extra"),
    [
        (agents, "name", {"role": "r"}),
        (agents, "role", {"name": "n"}),
        (tasks, "type", {"payload": {}}),
        (tasks, "error_message", {"type": "t", "payload": {}}),
        (sessions, "session_key", {}),
        (sessions, "user_id", {"session_key": "k"}),
        (sessions, "user_agent", {"session_key": "k"}),
        (achievements, "achievement_type", {"agent_id": uuid.uuid4()}),
    ],
)
def test_unstorable_text_is_refused_on_create(
    make: Callable[[], Any], field: str, extra: dict[str, Any], bad: str
) -> None:
    repo = make()
    assert fields_of(lambda: repo.create(**extra, **{field: bad})) == [field]


@pytest.mark.parametrize("bad", [NUL, SURROGATE])
def test_unstorable_text_is_refused_on_update(bad: str) -> None:
    assert fields_of(lambda: tasks().update(uuid.uuid4(), error_message=bad)) == ["error_message"]
    assert fields_of(lambda: agents().update(uuid.uuid4(), name=bad)) == ["name"]


def test_the_message_says_what_is_wrong_without_quoting_the_value() -> None:
    with pytest.raises(ValidationError) as info:
        agents().create(name="secret\x00", role="r")
    assert "NUL" in str(info.value)
    assert "secret" not in str(info.value)
    with pytest.raises(ValidationError) as info:
        agents().create(name="secret\ud800", role="r")
    assert "surrogate" in str(info.value)


# -- JSON: NUL, surrogates, keys, numbers, depth, size ------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"k": NUL},
        {NUL: 1},
        {"k": [1, {"deep": SURROGATE}]},
        {SURROGATE: "v"},
        {"k": {"inner\x00key": True}},
        {1: "int key"},
        {"k": float("nan")},
        {"k": float("inf")},
        {"k": 2**63},
        {"k": -(2**63) - 1},
        {"k": 10**5000},  # beyond even Python's int-to-str limit
        {"k": object()},
        {"k": {1, 2}},
        {"k": b"bytes"},
        {"k": datetime(2020, 1, 1)},
    ],
)
def test_unstorable_json_is_refused(payload: dict[Any, Any]) -> None:
    assert fields_of(lambda: tasks().create(type="t", payload=payload)) == ["payload"]
    assert fields_of(lambda: agents().create(name="n", role="r", metadata=payload)) == ["metadata"]
    assert fields_of(lambda: tasks().update(uuid.uuid4(), result=payload)) == ["result"]
    assert fields_of(lambda: sessions().create(session_key="k", data=payload)) == ["data"]


def test_json_accepts_what_jsonb_stores() -> None:
    value = {"s": "ünïcødé 🎉", "i": 2**63 - 1, "n": -(2**63), "f": -0.5, "b": True, "z": None}
    value["list"] = [1, "two", [3.0], {"four": 4}]
    out = load(TaskSchema(), {"type": "t", "payload": value}, partial=False, entity="task")
    assert out["payload"] == value
    assert load(TaskSchema(), {"result": "a string"}, partial=True, entity="task") == {
        "result": "a string"
    }


def test_json_depth_limit() -> None:
    ok = nested(rules.MAX_JSON_DEPTH)
    assert load(TaskSchema(), {"result": ok}, partial=True, entity="task") == {"result": ok}
    too_deep = nested(rules.MAX_JSON_DEPTH + 1)
    assert fields_of(lambda: tasks().update(uuid.uuid4(), result=too_deep)) == ["result"]
    with pytest.raises(ValidationError, match="levels deep"):
        tasks().create(type="t", payload={"k": too_deep})


def test_json_nested_beyond_the_recursion_limit_is_a_validation_error() -> None:
    # The walk is iterative: no RecursionError, whatever the depth.
    very_deep = nested(100_000)
    assert fields_of(lambda: tasks().create(type="t", payload={"k": very_deep})) == ["payload"]


def test_self_referencing_json_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    wide: dict[str, Any] = {}
    wide.update({str(i): wide for i in range(1000)})  # 1000 ** depth paths, if walked naively
    assert fields_of(lambda: tasks().update(uuid.uuid4(), result=loop)) == ["result"]
    assert fields_of(lambda: tasks().update(uuid.uuid4(), result=wide)) == ["result"]


def test_json_size_limits() -> None:
    fits = {"k": "x" * (rules.MAX_JSON_SIZE - 10)}  # {"k":"..."} is 8 characters more
    assert load(TaskSchema(), {"result": fits}, partial=True, entity="task")["result"] is fits
    too_big = {"k": "x" * rules.MAX_JSON_SIZE}
    assert fields_of(lambda: tasks().update(uuid.uuid4(), result=too_big)) == ["result"]
    many = list(range(rules.MAX_JSON_SIZE))  # the walk stops at the size bound, early
    assert fields_of(lambda: agents().update(uuid.uuid4(), metadata={"k": many})) == ["metadata"]
    # The search index makes the payload's limit smaller.
    searchable = {"k": "x" * rules.MAX_SEARCHABLE_JSON_SIZE}
    assert fields_of(lambda: tasks().create(type="t", payload=searchable)) == ["payload"]
    # Escapes count: the limit is on the JSON text.
    quotes = {"k": '"' * (rules.MAX_JSON_SIZE // 2)}
    assert fields_of(lambda: tasks().update(uuid.uuid4(), result=quotes)) == ["result"]


def test_capabilities_are_a_list_of_storable_strings() -> None:
    for bad in ("code", ["ok", NUL], ["x" * 256], [""], [1], {"code"}, [["nested"]]):
        assert fields_of(agents().create, name="n", role="r", capabilities=bad) == ["capabilities"]
    out = load(AgentSchema(), {"capabilities": ("a", "b")}, partial=True, entity="agent")
    assert out == {"capabilities": ["a", "b"]}


def test_achievement_task_id_must_fit_its_index() -> None:
    agent_id = uuid.uuid4()
    too_long = {"task_id": "t" * 256}
    assert fields_of(
        lambda: achievements().create(agent_id=agent_id, achievement_type="x", metadata=too_long)
    ) == ["metadata"]
    out = load(
        AchievementSchema(),
        {"agent_id": agent_id, "achievement_type": "x", "metadata": {"task_id": str(agent_id)}},
        partial=False,
        entity="achievement",
    )
    assert out["metadata_"] == {"task_id": str(agent_id)}


# -- integers: the column type's range, and the CHECK constraints --------------------------


@pytest.mark.parametrize("bad", [2**31, -(2**31) - 1, 10**40, -1, True, 1.0, "3"])
@pytest.mark.parametrize(
    ("make", "field", "extra"),
    [
        (tasks, "retry_count", {"type": "t", "payload": {}}),
        (tasks, "max_retries", {"type": "t", "payload": {}}),
        (achievements, "points", {"agent_id": uuid.uuid4(), "achievement_type": "x"}),
    ],
)
def test_integers_beyond_postgresql_integer_are_refused(
    make: Callable[[], Any], field: str, extra: dict[str, Any], bad: object
) -> None:
    repo = make()
    assert fields_of(lambda: repo.create(**extra, **{field: bad})) == [field]
    assert fields_of(lambda: repo.update(uuid.uuid4(), **{field: bad})) == [field]


def test_the_largest_integer_fits() -> None:
    out = load(TaskSchema(), {"retry_count": 2**31 - 1}, partial=True, entity="task")
    assert out == {"retry_count": 2**31 - 1}
    assert fields_of(lambda: tasks().create(type="t", payload={}, priority=11)) == ["priority"]


# -- datetimes: aware everywhere, within range, stored in UTC --------------------------------


def test_naive_datetimes_are_refused_everywhere() -> None:
    naive = datetime(2026, 1, 1)
    assert fields_of(lambda: tasks().update(uuid.uuid4(), started_at=naive)) == ["started_at"]
    assert fields_of(lambda: sessions().create(session_key="k", expires_at=naive)) == ["expires_at"]
    assert fields_of(lambda: agents().list(created_after=naive)) == ["created_after"]
    assert fields_of(lambda: tasks().count(created_before=naive)) == ["created_before"]
    assert fields_of(lambda: audit().list(since=naive)) == ["since"]
    assert fields_of(lambda: audit().between(until=naive)) == ["until"]
    assert fields_of(lambda: sessions().delete_expired(naive)) == ["now"]
    assert fields_of(lambda: tasks().list(after=forged("dt", naive.isoformat(), str(uuid.uuid4()))))
    assert fields_of(lambda: tasks().update(uuid.uuid4(), started_at="2026-01-01T00:00:00")) == [
        "started_at"
    ]


@pytest.mark.parametrize("bad", ["yesterday", 1700000000, 1.5, "2026-01-01", [MOMENT], b"x"])
@pytest.mark.parametrize("name", ["created_after", "created_before"])
def test_created_after_and_before_must_be_datetimes(name: str, bad: object) -> None:
    for repo in (agents(), tasks(), sessions(), achievements()):
        assert fields_of(repo.list, **{name: bad}) == [name]
        assert fields_of(repo.count, **{name: bad}) == [name]


def test_aware_datetimes_and_iso_text_with_an_offset_are_accepted_as_utc() -> None:
    plus5 = timezone(timedelta(hours=5))
    out = load(
        TaskSchema(),
        {
            "started_at": datetime(2026, 1, 1, 5, tzinfo=plus5),
            "completed_at": "2026-01-01T06:00+01",
        },
        partial=True,
        entity="task",
    )
    assert out["started_at"] == datetime(2026, 1, 1, tzinfo=UTC)
    assert out["started_at"].tzinfo is UTC
    assert out["completed_at"] == datetime(2026, 1, 1, 5, tzinfo=UTC)
    with pytest.raises(UnboundExecutionError):  # valid: on to the database
        agents().list(created_after=datetime(2026, 1, 1, tzinfo=plus5))


def test_datetimes_outside_the_storable_range_are_refused() -> None:
    east = timezone(timedelta(hours=14))
    for bad in (
        datetime.min.replace(tzinfo=east),  # before year 1 in UTC
        datetime.max.replace(tzinfo=timezone(timedelta(hours=-14))),  # after 9999 in UTC
        datetime(1, 1, 1, 12, tzinfo=UTC),  # inside the day of margin
    ):
        assert fields_of(tasks().update, uuid.uuid4(), completed_at=bad) == ["completed_at"]
        assert fields_of(agents().list, created_before=bad) == ["created_before"]


# -- filters of the wrong type ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "filters", "field"),
    [
        (agents, {"capability": 5}, "capability"),
        (agents, {"capability": [5]}, "capability"),
        (agents, {"capability": ["ok", NUL]}, "capability"),
        (agents, {"capability": {"a": 1}}, "capability"),
        (agents, {"status": 5}, "status"),
        (agents, {"role": 5}, "role"),
        (agents, {"name": SURROGATE}, "name"),
        (agents, {"role": "x" * 101}, "role"),
        (tasks, {"status": 5}, "status"),
        (tasks, {"status": [5]}, "status"),
        (tasks, {"status": ["pending", "done"]}, "status"),
        (tasks, {"type": NUL}, "type"),
        (tasks, {"agent_id": 5}, "agent_id"),
        (tasks, {"priority_min": 2**40}, "priority_min"),
        (tasks, {"priority_max": "3"}, "priority_max"),
        (sessions, {"user_id": NUL}, "user_id"),
        (sessions, {"expired": "yes"}, "expired"),
        (sessions, {"expired": 1}, "expired"),
        (achievements, {"agent_id": "nope"}, "agent_id"),
        (achievements, {"achievement_type": ["x"]}, "achievement_type"),
        (audit, {"resource_type": 5}, "resource_type"),
        (audit, {"resource_type": ["agent"]}, "resource_type"),
        (audit, {"resource_id": NUL}, "resource_id"),
        (audit, {"actor_type": "t" * 51}, "actor_type"),
        (audit, {"actor_id": 5}, "actor_id"),
        (audit, {"action": SURROGATE}, "action"),
        (audit, {"txid": 2**64}, "txid"),
        (audit, {"correlation_id": NUL}, "correlation_id"),
    ],
)
def test_filters_of_the_wrong_type_are_validation_errors(
    make: Callable[[], Any], filters: dict[str, Any], field: str
) -> None:
    repo = make()
    assert fields_of(lambda: repo.list(**filters)) == [field]
    assert fields_of(lambda: repo.count(**filters)) == [field]


def test_every_bad_filter_is_named_at_once() -> None:
    assert fields_of(lambda: tasks().list(status=5, type=NUL, colour="red")) == [
        "colour",
        "status",
        "type",
    ]


def test_valid_filters_get_to_the_database() -> None:
    for call in (
        lambda: agents().list(capability="code", status="idle", role="r"),
        lambda: agents().list(capability=("a", "b")),
        lambda: tasks().list(status={"pending", "failed"}, priority_min=1, priority_max=10),
        lambda: sessions().count(expired=False, user_id="u"),
        lambda: audit().list(resource_id=uuid.uuid4(), since=MOMENT),
        lambda: agents().get_by_name("n"),
    ):
        with pytest.raises(UnboundExecutionError):
            call()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": True}, "limit"),
        ({"limit": 10**30}, "limit"),
        ({"limit": 1.0}, "limit"),
        ({"order_by": ["name"]}, "order_by"),
        ({"order_by": {"x": 1}}, "order_by"),
        ({"order_by": 5}, "order_by"),
        ({"descending": "no"}, "descending"),
        ({"cached": "yes"}, "cached"),
        ({"after": 5}, "after"),
        ({"after": b"cursor"}, "after"),
    ],
)
def test_list_arguments_of_the_wrong_type(kwargs: dict[str, Any], field: str) -> None:
    assert fields_of(lambda: agents().list(**kwargs)) == [field]


def test_other_queries_check_their_arguments() -> None:
    assert fields_of(lambda: agents().search(NUL)) == ["query"]
    assert fields_of(lambda: tasks().search("ok", limit=True)) == ["limit"]
    assert fields_of(lambda: tasks().search("ok", status=5)) == ["status"]
    assert fields_of(lambda: agents().get_by_name(SURROGATE)) == ["name"]
    assert fields_of(lambda: sessions().get_by_key(NUL)) == ["session_key"]
    assert fields_of(lambda: tasks().claim_next(uuid.uuid4(), types=[NUL])) == ["types"]
    assert fields_of(lambda: tasks().claim_next(uuid.uuid4(), types=cast(Any, 5))) == ["types"]
    assert fields_of(lambda: achievements().leaderboard(agent_ids=cast(Any, 5))) == ["agent_ids"]
    assert fields_of(lambda: achievements().points_of(NUL)) == ["agent_id"]


# -- keyset cursors whose parts have the wrong types ----------------------------------------------


def test_a_cursor_is_checked_against_the_order_column() -> None:
    ident = str(uuid.uuid4())
    # Made for order_by="name", used with the default order (created_at).
    by_name = encode_cursor("researcher-1", uuid.UUID(ident))
    assert fields_of(lambda: agents().list(after=by_name)) == ["after"]
    with pytest.raises(UnboundExecutionError):
        agents().list(after=by_name, order_by="name")
    for bad, order in (
        (forged("v", 1.5, ident), "priority"),
        (forged("v", 11, ident), "priority"),
        (forged("v", True, ident), "priority"),
        (forged("v", 2**40, ident), "priority"),
        (forged("v", None, ident), "priority"),  # not nullable
        (forged("v", NUL, ident), "created_at"),
        (forged("dt", 5, ident), "created_at"),
        (forged("dt", "not a time", ident), "created_at"),
        (forged("v", [1], ident), "created_at"),
        (forged("uuid", "x", ident), "created_at"),
        (forged("v", 5, 5), "priority"),
        (forged("v", 5, [ident]), "priority"),
        (forged("v", 5, ident, "extra"), "priority"),
        (forged("x", 5, ident), "priority"),
        (base64.urlsafe_b64encode(b"[" * 3000).decode(), "priority"),  # json recursion
        (base64.urlsafe_b64encode(json.dumps({"a": 1, "b": 2, "c": 3}).encode()).decode(), None),
        ("é" * 10, None),
        ("A" * (MAX_CURSOR_LENGTH + 1), None),
    ):
        assert fields_of(tasks().list, after=bad, order_by=order) == ["after"]


def test_a_null_in_a_cursor_is_a_position_on_a_nullable_column() -> None:
    cursor = encode_cursor(None, uuid.uuid4())
    with pytest.raises(UnboundExecutionError):
        sessions().list(after=cursor, order_by="expires_at")
    assert fields_of(lambda: sessions().list(after=cursor)) == ["after"]  # created_at: NOT NULL


def test_cursor_round_trip_keeps_the_instant() -> None:
    ident = uuid.uuid4()
    plus2 = datetime(2026, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    value, back = decode_cursor(encode_cursor(plus2, ident))
    assert (value, back) == (plus2, ident)
    assert value.tzinfo is UTC


# -- the Actor ----------------------------------------------------------------------


def test_actor_limits_are_the_audit_columns() -> None:
    assert AuditLog.__table__.c.actor_type.type.length == ACTOR_TYPE_MAX_LENGTH  # type: ignore[attr-defined]
    assert AuditLog.__table__.c.actor_id.type.length == ACTOR_ID_MAX_LENGTH  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"type": "t" * 51}, "actor.type"),
        ({"type": ""}, "actor.type"),
        ({"type": NUL}, "actor.type"),
        ({"type": 5}, "actor.type"),
        ({"type": "user", "id": "i" * 256}, "actor.id"),
        ({"type": "user", "id": SURROGATE}, "actor.id"),
        ({"type": "user", "id": 42}, "actor.id"),
        ({"type": "user", "id": ""}, "actor.id"),
        ({"type": "user", "ip": "999.1.1.1"}, "actor.ip"),
        ({"type": "user", "ip": "10.0.0.1\x00"}, "actor.ip"),
        ({"type": "user", "ip": "fe80::1%eth0"}, "actor.ip"),
        ({"type": "user", "ip": "localhost"}, "actor.ip"),
        ({"type": "user", "ip": 167772161}, "actor.ip"),
        ({"type": "user", "ip": "10.0.0.1/33"}, "actor.ip"),
    ],
)
def test_actor_fields_are_validated_when_made(kwargs: dict[str, Any], field: str) -> None:
    assert fields_of(lambda: Actor(**kwargs)) == [field]


def test_every_bad_actor_field_is_named() -> None:
    assert fields_of(lambda: Actor("t" * 51, NUL, "nope")) == ["actor.id", "actor.ip", "actor.type"]


def test_actor_ip_is_kept_in_canonical_form() -> None:
    assert Actor("user", "u", "10.0.0.7").ip == "10.0.0.7"
    assert Actor("user", "u", "2001:DB8:0::1").ip == "2001:db8::1"
    assert Actor("user", "u", "10.0.0.7/24").ip == "10.0.0.7/24"
    assert Actor("user", "u", "10.0.0.7/32").ip == "10.0.0.7"
    assert Actor("user", "u", ipaddress.ip_address("::1")).ip == "::1"  # type: ignore[arg-type]
    assert Actor("user", "u", "2001:db8::1") == Actor("user", "u", "2001:DB8::1")
    assert Actor("system").id is None


def test_a_unit_of_work_refuses_what_is_not_an_actor() -> None:
    with pytest.raises(ValidationError) as info:
        Actor.checked("alice")
    assert info.value.fields == ["actor"]
    with pytest.raises(ValidationError), acting_as("alice"):  # type: ignore[arg-type]
        pass
    assert Actor.checked(None) is None


# -- the rules themselves ------------------------------------------------------------


def test_rules_are_the_same_for_schemas_and_filters() -> None:
    # One rule set: a value the schema refuses, the filter refuses too, and
    # with the same message.
    with pytest.raises(ValidationError) as created:
        agents().create(name="n", role="x" * 101)
    with pytest.raises(ValidationError) as filtered:
        agents().list(role="x" * 101)
    assert created.value.messages["role"] == filtered.value.messages["role"]


def test_schemas_take_their_limits_from_the_columns() -> None:
    role = AgentSchema().fields["role"]
    assert (role.min_length, role.max_length) == (1, 100)  # type: ignore[attr-defined]
    points = AchievementSchema().fields["points"]
    assert (points.low, points.high) == (0, 2**31 - 1)  # type: ignore[attr-defined]
    priority = TaskSchema().fields["priority"]
    assert (priority.low, priority.high) == (1, 10)  # type: ignore[attr-defined]
    assert SessionSchema().fields["user_agent"].max_length == rules.MAX_TEXT_LENGTH  # type: ignore[attr-defined]
    assert SessionSchema().fields["user_id"].allow_none
    assert not AgentSchema().fields["name"].allow_none


def test_rules_import_without_sqlalchemy() -> None:
    import subprocess
    import sys

    code = "import orchestrator_data.schemas.rules, orchestrator_data, sys\nprint(*sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert "sqlalchemy" not in loaded
    assert "marshmallow" not in loaded
