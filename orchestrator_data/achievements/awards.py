"""Achievement rules: what an agent earns when one of its tasks completes.

Rules look at the completed task and at the agent's record (tasks completed,
current streak of completions since its last failed task). Awarding is
idempotent: the unique indexes of migration 004 let at most one row exist per
one-time achievement and agent, or per repeatable achievement, agent and
task, so evaluating a task twice, or two workers at once, awards once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, literal, select

from orchestrator_data.errors import ConflictError
from orchestrator_data.models import ONE_TIME_ACHIEVEMENTS, Achievement, Task
from orchestrator_data.uow import UnitOfWork


@dataclass(frozen=True)
class AgentRecord:
    """What the rules know about an agent, read in the awarding transaction."""

    agent_id: uuid.UUID
    completed: int  # tasks completed, ever
    streak: int  # tasks completed since the agent's last failed task


@dataclass(frozen=True)
class Rule:
    """Award ``achievement_type`` worth ``points`` when ``applies(record, task)``.
    ``once``: at most once per agent; otherwise at most once per task."""

    achievement_type: str
    points: int
    once: bool
    applies: Callable[[AgentRecord, Task], bool] = field(repr=False)
    details: Callable[[AgentRecord, Task], dict[str, Any]] = field(
        default=lambda record, task: {}, repr=False
    )


def milestone(achievement_type: str, points: int, completed: int) -> Rule:
    """One-time: the agent has completed ``completed`` tasks."""
    return Rule(
        achievement_type,
        points,
        once=True,
        applies=lambda record, task: record.completed >= completed,
        details=lambda record, task: {"completed": record.completed},
    )


def streak(points: int, length: int) -> Rule:
    """Each ``length`` consecutive completions without a failed task."""
    return Rule(
        "completion_streak",
        points,
        once=False,
        applies=lambda record, task: record.streak > 0 and record.streak % length == 0,
        details=lambda record, task: {"streak": record.streak},
    )


def fast_completion(points: int, within: timedelta) -> Rule:
    """A task completed at most ``within`` after it started."""

    def seconds(task: Task) -> float | None:
        if task.started_at is None or task.completed_at is None:
            return None
        return (task.completed_at - task.started_at).total_seconds()

    def applies(record: AgentRecord, task: Task) -> bool:
        took = seconds(task)
        return took is not None and 0 <= took <= within.total_seconds()

    return Rule(
        "fast_completion",
        points,
        once=False,
        applies=applies,
        details=lambda record, task: {
            "seconds": seconds(task),
            "within": within.total_seconds(),
        },
    )


DEFAULT_RULES: tuple[Rule, ...] = (
    milestone("first_task", 10, 1),
    milestone("tasks_10", 50, 10),
    milestone("tasks_100", 250, 100),
    streak(20, 5),
    fast_completion(5, timedelta(seconds=1)),
)


class Awards:
    """Evaluates ``rules`` (default :data:`DEFAULT_RULES`) for completed tasks."""

    def __init__(self, rules: Sequence[Rule] = DEFAULT_RULES) -> None:
        for rule in rules:
            if rule.once != (rule.achievement_type in ONE_TIME_ACHIEVEMENTS):
                # Idempotency rests on the unique indexes of migration 004.
                raise ValueError(
                    f"{rule.achievement_type}: one-time achievements are "
                    f"{', '.join(ONE_TIME_ACHIEVEMENTS)}; a new one needs a migration"
                )
        self.rules = tuple(rules)

    def evaluate(self, uow: UnitOfWork, task: Task) -> list[Achievement]:
        """Award what ``task`` (just completed, in ``uow``) earns its agent; return
        the achievements newly awarded. Call it in the transaction that completed
        the task. Nothing for tasks not completed or without an agent."""
        if task.status != "completed" or task.agent_id is None:
            return []
        uow.session.flush()
        record = agent_record(uow, task.agent_id)
        held = _held_one_time(uow, task.agent_id)
        awarded = []
        for rule in self.rules:
            if rule.once and rule.achievement_type in held:
                continue
            if not rule.applies(record, task):
                continue
            details = {"task_id": str(task.id), **rule.details(record, task)}
            achievement = award(uow, task.agent_id, rule.achievement_type, rule.points, details)
            if achievement is not None:
                awarded.append(achievement)
        return awarded


def award(
    uow: UnitOfWork,
    agent_id: uuid.UUID,
    achievement_type: str,
    points: int,
    metadata: dict[str, Any],
) -> Achievement | None:
    """Insert one achievement unless the unique indexes say it exists already
    (``None`` then). A savepoint confines the failed INSERT, and its audit row,
    so the rest of the transaction carries on."""
    session = uow.session
    achievement = Achievement(
        agent_id=agent_id, achievement_type=achievement_type, points=points, metadata_=metadata
    )
    try:
        with session.begin_nested():
            session.add(achievement)
            session.flush()
    except ConflictError as err:
        if err.constraint not in ("uq_achievements_award_once", "uq_achievements_award_per_task"):
            raise
        return None
    return achievement


def agent_record(uow: UnitOfWork, agent_id: uuid.UUID) -> AgentRecord:
    """Completed tasks of ``agent_id`` and its current streak, in one query."""
    finished_at = func.coalesce(Task.completed_at, Task.updated_at)
    last_failure = (
        select(func.max(finished_at))
        .where(Task.agent_id == agent_id, Task.status == "failed")
        .scalar_subquery()
    )
    completed = Task.status == "completed"
    never = literal("-infinity").cast(Task.completed_at.type)
    since_failure = finished_at > func.coalesce(last_failure, never)
    row = uow.session.execute(
        select(
            func.count().filter(completed),
            func.count().filter(and_(completed, since_failure)),
        ).where(Task.agent_id == agent_id)
    ).one()
    return AgentRecord(agent_id, int(row[0]), int(row[1]))


def _held_one_time(uow: UnitOfWork, agent_id: uuid.UUID) -> set[str]:
    rows = uow.session.scalars(
        select(Achievement.achievement_type).where(
            Achievement.agent_id == agent_id,
            Achievement.achievement_type.in_(ONE_TIME_ACHIEVEMENTS),
        )
    )
    return set(rows)
