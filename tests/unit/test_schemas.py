from __future__ import annotations

import pytest

from orchestrator_data import ValidationError
from orchestrator_data.schemas import AgentSchema, SessionSchema, TaskSchema, load


def _errors(schema: object, data: dict[str, object], partial: bool = False) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        load(schema, data, partial=partial, entity="x")  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize("priority", [0, 11, -1, "5", 5.5, None])
def test_task_priority_must_be_an_integer_1_to_10(priority: object) -> None:
    err = _errors(TaskSchema(), {"type": "t", "payload": {}, "priority": priority})
    assert err.fields == ["priority"]


def test_every_bad_field_is_named() -> None:
    err = _errors(
        AgentSchema(),
        {
            "name": "x" * 256,
            "status": "sleeping",
            "capabilities": "code",
            "metadata": [1],
            "color": "red",
        },
    )
    assert err.fields == ["capabilities", "color", "metadata", "name", "role", "status"]
    assert "name" in str(err)


def test_payload_must_be_a_json_object() -> None:
    assert _errors(TaskSchema(), {"type": "t", "payload": [1, 2]}).fields == ["payload"]
    assert _errors(TaskSchema(), {"type": "t", "payload": {"x": object()}}).fields == ["payload"]
    assert _errors(TaskSchema(), {"type": "t", "payload": {"x": float("nan")}}).fields == [
        "payload"
    ]


def test_metadata_maps_to_the_model_attribute() -> None:
    out = load(
        AgentSchema(),
        {"name": "a", "role": "r", "metadata": {"k": 1}},
        partial=False,
        entity="agent",
    )
    assert out == {"name": "a", "role": "r", "metadata_": {"k": 1}}


def test_partial_update_validates_only_given_fields() -> None:
    assert load(TaskSchema(), {"status": "completed"}, partial=True, entity="task") == {
        "status": "completed"
    }
    assert _errors(TaskSchema(), {"status": "done"}, partial=True).fields == ["status"]


def test_ip_address_is_validated_and_normalised() -> None:
    out = load(
        SessionSchema(),
        {"session_key": "k", "ip_address": "2001:db8::1"},
        partial=False,
        entity="s",
    )
    assert out["ip_address"] == "2001:db8::1"
    assert _errors(SessionSchema(), {"session_key": "k", "ip_address": "999.1.1.1"}).fields == [
        "ip_address"
    ]
