"""What a newcomer reads when a setting or an argument is wrong: plain words,
the name of what is wrong, never the value of a setting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator_data import ConfigurationError, Settings


@pytest.mark.parametrize(
    ("name", "raw", "said"),
    [
        ("ORCHESTRATOR_POOL_MAX", "abc", "must be a whole number (e.g. 20)"),
        ("ORCHESTRATOR_POOL_MAX", "2.5", "must be a whole number (e.g. 20)"),
        ("ORCHESTRATOR_POOL_TIMEOUT", "soon", "must be a number of seconds or a ratio (e.g. 2.5)"),
        ("ORCHESTRATOR_TTL_SESSION", "1h", "must be a whole number (e.g. 20)"),
    ],
)
def test_a_setting_of_the_wrong_type_says_what_it_must_be(name: str, raw: str, said: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env({name: raw})
    assert str(err.value) == f"{name} {said}"
    assert "a int" not in str(err.value) and raw not in str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator_data", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},  # no servers needed: the arguments are checked first
    )


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("0s", "'0s' must be positive, e.g. 90d"),
        ("0d", "'0d' must be positive, e.g. 90d"),
        ("soon", "'soon' is not a duration like 90d, 12h, 30m, 45s or 2w"),
        ("99999999999d", "'99999999999d' is too long: at most 999999999 days"),
    ],
)
def test_prune_durations_are_checked_before_anything_connects(value: str, said: str) -> None:
    out = _cli("audit", "prune", "--older-than", value)
    assert out.returncode == 2
    assert "Invalid value for '--older-than'" in out.stderr
    assert said in out.stderr
    assert "Traceback" not in out.stderr


def test_an_unknown_audit_type_names_the_known_ones() -> None:
    out = _cli("audit", "recent", "--type", "bogus")
    assert out.returncode == 2
    assert "'bogus' is not a resource type" in out.stderr
    assert "known types: achievement, agent, audit_log, session, task" in out.stderr


def test_help_lists_the_audit_commands() -> None:
    out = _cli("audit", "--help")
    assert out.returncode == 0
    for command in ("prune", "recent", "show"):
        assert f"  {command} " in out.stdout


def test_the_embedded_servers_switch_is_not_an_unknown_setting() -> None:
    # Read by orchestrator_data.embedded, not by Settings: the CLI must accept it.
    assert Settings.from_env({"ORCHESTRATOR_EMBEDDED_PG": "binaries"}) == Settings()
    with pytest.raises(ConfigurationError, match="unknown setting ORCHESTRATOR_EMBEDDED_PGX"):
        Settings.from_env({"ORCHESTRATOR_EMBEDDED_PGX": "binaries"})
