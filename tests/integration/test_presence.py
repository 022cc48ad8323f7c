"""Agent presence against a real Redis: the state lives for its TTL, and only
a status change reaches the agents table (and so the audit trail)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from orchestrator_data import CacheTTLs, DataLayer, ValidationError


def test_heartbeats_keep_state_and_write_only_status_changes(
    data_layer: DataLayer, make_data_layer: Callable[..., DataLayer]
) -> None:
    dl = make_data_layer(ttls=CacheTTLs(agent_state=1), warm_pool=False)
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name="present", role="coder", capabilities=["code"])
        other = uow.agents.create(name="absent", role="coder", capabilities=["code"])
        uow.commit()
    presence = dl.agent_state
    first = presence.heartbeat(agent.id, status="busy", metrics={"load": 0.5})
    assert (first.status, first.metrics) == ("busy", {"load": 0.5})
    presence.heartbeat(agent.id)  # keeps status and metrics
    presence.heartbeat(agent.id, status="busy", metrics={"load": 0.7})  # same status
    state = presence.get(agent.id)
    assert state is not None and (state.status, state.metrics) == ("busy", {"load": 0.7})
    assert [s.agent_id for s in presence.list_online()] == [agent.id]
    assert presence.get(other.id) is None

    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.get_or_raise(agent.id).status == "busy"
        history = uow.audit.history("agent", agent.id).items
    # One create, one status change: the repeated "busy" wrote nothing.
    assert [(r.action, r.actor_type) for r in history] == [
        ("create", "system"),
        ("update", "agent"),
    ]
    assert history[1].new_value == {"status": "busy"}

    presence.heartbeat(agent.id, status="idle")
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.get_or_raise(agent.id).status == "idle"
        assert len(uow.audit.history("agent", agent.id).items) == 3

    time.sleep(1.2)  # past the TTL
    assert presence.get(agent.id) is None
    assert presence.list_online() == []


def test_heartbeat_input_is_checked(data_layer: DataLayer) -> None:
    with pytest.raises(ValidationError, match="agent_id"):
        data_layer.agent_state.heartbeat("not-a-uuid")
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(name="checked", role="coder", capabilities=["code"])
        uow.commit()
    with pytest.raises(ValidationError, match="status"):
        data_layer.agent_state.heartbeat(agent.id, status="asleep")
    with pytest.raises(ValidationError, match="metrics"):
        data_layer.agent_state.heartbeat(agent.id, metrics={"x": float("nan")})
