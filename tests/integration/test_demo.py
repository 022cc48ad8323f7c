"""The main job, end to end, through the installed command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from fixtures.pytest_plugin import Servers
from orchestrator_data import Settings


def test_demo_runs_every_task_to_a_final_state(
    od_database_url: str, od_servers: Servers, od_settings: Settings
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": od_database_url,
        "REDIS_URL": od_servers.redis_url,
        # Under the run's prefix, so the run's clean-up removes the demo's keys.
        "ORCHESTRATOR_KEY_PREFIX": od_settings.key_prefix + "demo:",
    }
    exe = shutil.which("orchestrator-data")
    cmd = [exe] if exe else [sys.executable, "-m", "orchestrator_data"]
    out = subprocess.run(
        [*cmd, "demo", "--agents", "4", "--tasks", "60", "--workers", "3", "--seed", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    counts = {
        m[0]: int(m[1])
        for m in re.findall(
            r"^\s+(pending|assigned|in_progress|completed|failed)\s+(\d+)$", out.stdout, re.M
        )
    }
    assert sum(counts.values()) == 60
    assert counts["completed"] + counts["failed"] == 60
    assert counts["completed"] > 0
    assert re.search(r"transactions: \d+ \(\d+/s\)", out.stdout)
    assert re.search(r"serialization retries: \d+", out.stdout)
    # Every completed task earned at least a first_task somewhere: a leaderboard.
    assert int(re.findall(r"achievements awarded: (\d+)", out.stdout)[0]) > 0
    board = re.findall(r"^\s+\d+\. (demo-\S+)\s+(\d+) pts$", out.stdout, re.M)
    assert 1 <= len(board) <= 4
    points = [int(p) for _, p in board]
    assert points == sorted(points, reverse=True)
    assert points[0] >= 10
    ratio = re.search(r"cache hit ratio: (\d\.\d\d) \(L1 hits (\d+)", out.stdout)
    assert ratio, out.stdout
    assert float(ratio[1]) > 0 and int(ratio[2]) > 0


def test_bad_arguments_get_a_clear_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator_data", "demo", "--tasks", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--tasks" in out.stderr
