"""The package's own events: :func:`install_change_events` makes a
DataLayer publish, after each commit, on :data:`AGENT_STATUS` /
:data:`TASK_STATUS` when an agent's or a task's status is set or changes,
and on :data:`ACHIEVEMENT_AWARDED` when an achievement is created;
:func:`change_events` says which events a set of committed changes makes.
Subscribe to them with ``dl.events.subscribe(channel, handler)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.capture.change import Change
from orchestrator_data.capture.change_capture import ChangeCapture
from orchestrator_data.coordination.events import Events
from orchestrator_data.coordination.payloads import encode_payload

# The logger these events used before the split into modules: log filters on it still match.
log = logging.getLogger("orchestrator_data.coordination.events")

#: Channels of the package's own events (published after commit).
AGENT_STATUS = "agent.status"
TASK_STATUS = "task.status"
ACHIEVEMENT_AWARDED = "achievement.awarded"


def install_change_events(changes: ChangeCapture, events: Events) -> None:
    """Publish, after each commit, ``agent.status`` / ``task.status`` when a
    row is created or its status changes (``{"agent_id"|"task_id", "old",
    "new"}``) and ``achievement.awarded`` when an achievement is created
    (``{"achievement_id", "agent_id", "type", "points"}``). Best effort, like
    every after-commit publish. Makes the capture carry old and new values."""

    def publish_changes(session: OrmSession, committed: Sequence[Change]) -> None:
        try:
            messages = [
                (events.channel_key(channel), encode_payload(payload))
                for channel, payload in change_events(committed)
            ]
        except Exception:  # never raised into the committing code: logged and counted
            log.exception("could not build the events of a commit")
            events.count("lost_after_commit", 1)
            return
        events.send_after_commit(messages)

    # Status changes can only be seen in the values: ask the capture for them
    # (the audit trail does too when it is enabled).
    changes.on_flush(_values_wanted, values=True)
    changes.on_commit(publish_changes)


def _values_wanted(session: OrmSession, flushed: Sequence[Change]) -> None:
    """A flush listener that only makes the capture record values."""


def change_events(committed: Iterable[Change]) -> list[tuple[str, dict[str, Any]]]:
    """The (channel, payload) pairs of the package's own events in ``committed``."""
    out: list[tuple[str, dict[str, Any]]] = []
    for change in committed:
        new = change.new
        if change.action == "delete" or new is None:
            continue
        if change.entity in ("agent", "task") and new.get("status") is not None:
            old = (change.old or {}).get("status") if change.action == "update" else None
            if old == new["status"]:
                continue
            channel = AGENT_STATUS if change.entity == "agent" else TASK_STATUS
            out.append(
                (channel, {f"{change.entity}_id": change.ident, "old": old, "new": new["status"]})
            )
        elif change.entity == "achievement" and change.action == "create":
            out.append(
                (
                    ACHIEVEMENT_AWARDED,
                    {
                        "achievement_id": change.ident,
                        "agent_id": new.get("agent_id"),
                        "type": new.get("achievement_type"),
                        "points": new.get("points"),
                    },
                )
            )
    return out
