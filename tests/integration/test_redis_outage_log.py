"""Redis going away is said once, and its return once, with a count of what
was skipped meanwhile: not one warning per commit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from fixtures.own_servers import OwnRedis
from orchestrator_data import DataLayer


def test_an_outage_logs_one_warning_each_way_and_stats_catch_up(
    data_layer: DataLayer,
    make_data_layer: Callable[..., DataLayer],
    own_redis: OwnRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dl = make_data_layer(redis_url=own_redis.url, cache_probe_interval=0.1, warm_pool=False)
    assert dl.cache.wait_ready()
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name="outage", role="coder", capabilities=["code"])
        uow.commit()
    assert dl.stats.points_of(agent.id) == 0  # cached in Redis now

    own_redis.kill()
    caplog.set_level(logging.WARNING, logger="orchestrator_data")
    for i in range(30):
        with dl.unit_of_work() as uow:
            uow.achievements.create(agent_id=agent.id, achievement_type=f"outage-{i}", points=10)
            uow.commit()
        assert dl.stats.points_of(agent.id) == 10 * (i + 1)  # from PostgreSQL
    down = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(down) == 1, [r.getMessage() for r in down]
    assert "redis cache unavailable" in down[0].getMessage()

    own_redis.start()  # empty: the old cached total is gone with it anyway
    deadline = time.monotonic() + 10
    while not dl.cache.usable and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dl.cache.usable
    back = [r for r in caplog.records if r.levelno >= logging.WARNING][1:]
    assert len(back) == 1, [r.getMessage() for r in back]
    skipped = back[0].getMessage()
    assert "available again" in skipped
    assert int(skipped.split("(")[1].split()[0]) > 0  # "(N cache calls skipped ...)"
    assert dl.stats.points_of(agent.id) == 300
