"""The README documents every setting and the two set-up commands."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from orchestrator_data import CacheTTLs, Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [
        f.name for f in fields(Settings) if f.name != "ttls" and f"| `{f.name}` |" not in README
    ]
    missing += [f"ttls.{f.name}" for f in fields(CacheTTLs) if f"| `ttls.{f.name}` |" not in README]
    assert missing == []


def test_the_two_set_up_commands_are_there() -> None:
    assert 'pip install -e ".[embedded]" && orchestrator-data demo' in README
    assert 'pip install -e ".[embedded,test]" && pytest' in README
