"""The main job: agents take, complete, sometimes fail and retry tasks.

Every step is a real SERIALIZABLE transaction through the public API, run by
several worker threads at once, so retries happen for real.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import TypeVar

from sqlalchemy import func, select

from orchestrator_data.achievements.awards import Awards
from orchestrator_data.actor import Actor
from orchestrator_data.datalayer import DataLayer
from orchestrator_data.errors import RetryExhaustedError
from orchestrator_data.models import Task
from orchestrator_data.uow import UnitOfWork

CAPABILITIES = ("plan", "search", "code", "review", "summarize", "translate")
TASK_TYPES = ("summarize", "classify", "translate", "extract", "review")
ROLES = ("planner", "researcher", "coder", "reviewer")

T = TypeVar("T")


@dataclass
class DemoReport:
    run_id: str
    agents: int
    tasks: int
    by_status: dict[str, int]
    attempts_failed: int
    transactions: int
    retries: int
    #: Transactions that exhausted their retries (and were run again).
    gave_up: int
    seconds: float
    achievements: int = 0
    #: ``(name, points)`` of this run's best agents, most points first.
    leaderboard: list[tuple[str, int]] = field(default_factory=list)
    #: Cache counters of the run (``dl.cache.stats()`` differences).
    cache: dict[str, float] = field(default_factory=dict)

    @property
    def ops_per_second(self) -> float:
        return self.transactions / self.seconds if self.seconds > 0 else 0.0


def run_demo(
    dl: DataLayer,
    *,
    agents: int = 8,
    tasks: int = 200,
    workers: int = 4,
    failure_rate: float = 0.2,
    seed: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> DemoReport:
    """Register ``agents`` agents, enqueue ``tasks`` tasks, and let ``workers``
    threads drive them to completion. ``on_progress(n)`` is called from the
    calling thread each time ``n`` more tasks reach a final state."""
    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:8]
    admin = Actor("system", "demo")
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    transactions_before = _transactions(dl)
    retries_before = dl.metrics.retries
    cache_before = dl.cache.stats()

    def register(uow: UnitOfWork) -> list[uuid.UUID]:
        ids = []
        for i in range(agents):
            agent = uow.agents.create(
                name=f"demo-{run_id}-agent-{i:03d}",
                role=rng.choice(ROLES),
                status="active",
                capabilities=rng.sample(CAPABILITIES, 3),
                metadata={"run": run_id},
            )
            ids.append(agent.id)
        return ids

    agent_ids = dl.run_in_transaction(register, actor=admin)

    def enqueue(uow: UnitOfWork) -> None:
        for i in range(tasks):
            uow.tasks.create(
                type=rng.choice(TASK_TYPES),
                payload={"run": run_id, "n": i, "text": f"demo document {i}"},
                priority=rng.randint(1, 10),
                max_retries=2,
            )

    dl.run_in_transaction(enqueue, actor=admin)

    finished: queue.Queue[int] = queue.Queue()
    failed_attempts = [0]
    gave_up = [0]
    lock = threading.Lock()

    def persist(fn: Callable[[UnitOfWork], T], actor: Actor) -> T:
        # A transaction that exhausted its retries committed nothing: the
        # agent counts it and runs it again, as a real worker would.
        while True:
            try:
                return dl.run_in_transaction(fn, actor=actor)
            except RetryExhaustedError:
                with lock:
                    gave_up[0] += 1

    def worker(index: int) -> None:
        local = random.Random(None if seed is None else seed + index)
        while True:
            agent_id = local.choice(agent_ids)
            actor = Actor("agent", str(agent_id))
            # An agent looks itself up before taking work: a read-only unit of
            # work, served by the cache once the profile is in it.
            with dl.unit_of_work(read_only=True) as lookup:
                if lookup.agents.get(agent_id) is None:
                    return
            claimed = persist(partial(_claim, agent_id=agent_id), actor)
            if claimed is None:
                return
            fail = local.random() < failure_rate
            final = persist(partial(_finish, task_id=claimed, fail=fail, awards=dl.awards), actor)
            if fail:
                with lock:
                    failed_attempts[0] += 1
            if final:
                finished.put(1)

    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True) for i in range(max(1, workers))
    ]
    for t in threads:
        t.start()
    done = 0
    while done < tasks and any(t.is_alive() for t in threads):
        try:
            finished.get(timeout=0.1)
        except queue.Empty:
            continue
        done += 1
        if on_progress is not None:
            on_progress(1)
    for t in threads:
        t.join()
    while not finished.empty():
        finished.get()
        if on_progress is not None:
            on_progress(1)

    with dl.unit_of_work(read_only=True) as uow:
        rows = uow.session.execute(
            select(Task.status, func.count())
            .where(Task.payload.contains({"run": run_id}))
            .group_by(Task.status)
        ).all()
        by_status = {status: int(n) for status, n in rows}
        awarded = uow.achievements.count(created_after=started_at)
        for agent_id in agent_ids:
            uow.agents.get(agent_id)
        board = uow.achievements.leaderboard(limit=5, agent_ids=agent_ids)
    return DemoReport(
        run_id=run_id,
        agents=agents,
        tasks=tasks,
        by_status=by_status,
        attempts_failed=failed_attempts[0],
        gave_up=gave_up[0],
        transactions=_transactions(dl) - transactions_before,
        retries=dl.metrics.retries - retries_before,
        seconds=time.perf_counter() - started,
        achievements=awarded,
        leaderboard=[(name, points) for _, name, points in board],
        cache=_cache_delta(cache_before, dl.cache.stats()),
    )


def _claim(uow: UnitOfWork, agent_id: uuid.UUID) -> uuid.UUID | None:
    task = uow.tasks.claim_next(agent_id)
    if task is None:
        return None
    task.status = "in_progress"
    task.started_at = datetime.now(timezone.utc)
    return task.id


def _finish(uow: UnitOfWork, task_id: uuid.UUID, fail: bool, awards: Awards) -> bool:
    """Complete or fail the task; a failed task with retries left goes back to
    pending. A completed task may earn its agent achievements, in the same
    transaction. Returns True when the task reached a final state."""
    task = uow.tasks.get_or_raise(task_id)
    now = datetime.now(timezone.utc)
    if not fail:
        done = uow.tasks.update(task_id, status="completed", completed_at=now, result={"ok": True})
        awards.evaluate(uow, done)
        return True
    if task.retry_count < task.max_retries:
        uow.tasks.update(
            task_id,
            status="pending",
            retry_count=task.retry_count + 1,
            error_message="simulated failure",
            agent_id=None,
        )
        return False
    uow.tasks.update(task_id, status="failed", completed_at=now, error_message="simulated failure")
    return True


def _cache_delta(before: dict[str, object], after: dict[str, object]) -> dict[str, float]:
    names = ("l1_hits", "l2_hits", "loads", "bypassed", "invalidations", "fills_refused")
    out = {n: float(after[n]) - float(before[n]) for n in names}  # type: ignore[arg-type]
    lookups = out["l1_hits"] + out["l2_hits"] + out["loads"]
    out["hit_ratio"] = (out["l1_hits"] + out["l2_hits"]) / lookups if lookups else 0.0
    return out


def _transactions(dl: DataLayer) -> int:
    total = 0.0
    for metric in dl.metrics.transactions.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return int(total)
