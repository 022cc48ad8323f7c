"""docker-compose.yml describes the stack the README promises (checked as YAML, no Docker)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"

# A password must come from the environment and be required: ${VAR:?message}
REQUIRED_VARIABLE = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def host_ports(service: dict[str, Any]) -> dict[int, int]:
    """Map host port -> container port from short-syntax "[ip:]host:container" entries."""
    ports: dict[int, int] = {}
    for entry in service.get("ports", []):
        *_, host, container = str(entry).split(":")
        ports[int(host)] = int(container)
    return ports


def redis_flags(service: dict[str, Any]) -> dict[str, str]:
    command = service["command"]
    args = command.split() if isinstance(command, str) else [str(arg) for arg in command]
    flags = [arg for arg in args if arg.startswith("--")]
    return {flag: args[args.index(flag) + 1] for flag in flags}


def test_services_and_images(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {
        "postgres",
        "redis",
        "grafana",
        "pgadmin",
        "redis-commander",
        "redisinsight",
    }
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert services["pgadmin"]["image"].startswith("dpage/pgadmin4")
    assert services["redisinsight"]["image"].startswith("redis/redisinsight")


@pytest.mark.parametrize(
    ("service", "host", "container"),
    [
        ("postgres", 5432, 5432),
        ("redis", 6379, 6379),
        ("grafana", 3000, 3000),
        ("pgadmin", 5050, 80),
        ("redis-commander", 8081, 8081),
        ("redisinsight", 8001, 5540),
    ],
)
def test_host_ports(
    services: dict[str, dict[str, Any]], service: str, host: int, container: int
) -> None:
    assert host_ports(services[service]) == {host: container}


def test_postgres_database_user_and_health(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_DB"] == "agent_orchestrator"
    assert postgres["environment"]["POSTGRES_USER"] == "admin"
    assert REQUIRED_VARIABLE.match(postgres["environment"]["POSTGRES_PASSWORD"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(":/var/lib/postgresql/data" in volume for volume in postgres["volumes"])


def test_redis_persistence_memory_and_password(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    flags = redis_flags(redis)
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory"] == "512mb"
    assert flags["--maxmemory-policy"] == "allkeys-lru"
    assert REQUIRED_VARIABLE.match(flags["--requirepass"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_tools_wait_for_healthy_servers(services: dict[str, dict[str, Any]]) -> None:
    needs = {
        "grafana": {"postgres", "redis"},
        "pgadmin": {"postgres"},
        "redis-commander": {"redis"},
        "redisinsight": {"redis"},
    }
    for tool, servers in needs.items():
        depends_on = services[tool]["depends_on"]
        assert set(depends_on) == servers, tool
        assert {dep["condition"] for dep in depends_on.values()} == {"service_healthy"}, tool


def test_one_private_network(compose: dict[str, Any]) -> None:
    (network,) = compose["networks"]
    assert not compose["networks"][network].get("external", False)
    for name, service in compose["services"].items():
        assert service["networks"] == [network], name


def _strings(node: object, key: str = "") -> Iterator[tuple[str, str]]:
    """Every (key, string) in the YAML tree; list items carry their list's key."""
    if isinstance(node, dict):
        for child_key, child in node.items():
            yield from _strings(child, str(child_key))
    elif isinstance(node, list):
        for child in node:
            yield from _strings(child, key)
    elif node is not None:
        yield key, str(node)


def test_no_password_is_written_in_the_file(compose: dict[str, Any]) -> None:
    secrets = [value for key, value in _strings(compose) if re.search("PASS|AUTH", key)]
    command = compose["services"]["redis"]["command"]
    secrets.append(command[command.index("--requirepass") + 1])
    assert len(secrets) >= 5
    for value in secrets:
        assert REQUIRED_VARIABLE.match(value), f"literal or optional password: {value!r}"
    # No default value (${VAR:-literal}) for any password variable, anywhere in the text.
    assert not re.search(r"\$\{\w*(PASS|AUTH)\w*:?-", COMPOSE_FILE.read_text())
