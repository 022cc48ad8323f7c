"""Shared test configuration: the fixtures come from the package's pytest
plugin (fixtures/pytest_plugin.py, registered as a pytest11 entry point)."""

from __future__ import annotations

import pytest

# Servers a test owns (to kill, pause or fill): the own_redis fixture.
pytest_plugins = ("fixtures.own_servers",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
