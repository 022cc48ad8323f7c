"""Importing the package must not connect anywhere or read the environment."""

from __future__ import annotations

import os
import subprocess
import sys


def test_import_reads_no_environment_and_connects_nowhere() -> None:
    env = dict(os.environ)
    # Garbage that would fail if anything read it at import time.
    env.update(
        {
            "DATABASE_URL": "not a url",
            "REDIS_URL": "nonsense",
            "ORCHESTRATOR_NOT_A_SETTING": "1",
        }
    )
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('connected at import')\n"
        "socket.socket.connect = refuse\n"
        "import orchestrator_data, orchestrator_data.models, orchestrator_data.cli\n"
        "print(sorted(orchestrator_data.__all__)[:3])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "Actor" in out.stdout
