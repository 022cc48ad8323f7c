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

# An exact release: major.minor.patch, optionally followed by a variant ("7.4.2-alpine").
FULL_VERSION_TAG = re.compile(r"^v?\d+\.\d+\.\d+(?:[-+._][0-9A-Za-z][0-9A-Za-z.+_-]*)?$")
# PostgreSQL (since 10) and pgAdmin 4 number their releases major.minor: 16.8 and 8.14 are
# complete versions there, while "16" and "8" are the tags that move.
MAJOR_MINOR_RELEASES = frozenset({"postgres", "dpage/pgadmin4"})
MAJOR_MINOR_TAG = re.compile(r"^\d+\.\d+(?:-[0-9A-Za-z][0-9A-Za-z.+_-]*)?$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Compose durations: "5s", "1m30s", "500ms", ...
DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:h|m|s|ms|us|ns))+$")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)")
SECONDS_PER_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


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


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference; tag and digest are None when absent.

    A colon before the last "/" belongs to a registry host ("localhost:5000/app"), not a tag.
    """
    name, _, digest = image.partition("@")
    if ":" in name.rsplit("/", 1)[-1]:
        repository, _, tag = name.rpartition(":")
        return repository, tag, digest or None
    return name, None, digest or None


def is_pinned(image: str) -> bool:
    """True for a digest pin or a tag naming one exact release of that image."""
    repository, tag, digest = split_image(image)
    if digest is not None:
        return DIGEST.match(digest) is not None
    if tag is None:
        return False  # no tag means `latest`
    if FULL_VERSION_TAG.match(tag):
        return True
    return repository.removeprefix("docker.io/").removeprefix("library/") in (
        MAJOR_MINOR_RELEASES
    ) and bool(MAJOR_MINOR_TAG.match(tag))


def seconds(duration: str) -> float:
    assert DURATION.match(duration), f"not a compose duration: {duration!r}"
    return sum(
        float(amount) * SECONDS_PER_UNIT[unit] for amount, unit in DURATION_PART.findall(duration)
    )


def test_services_and_images(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {
        "postgres",
        "redis",
        "grafana",
        "pgadmin",
        "redis-commander",
        "redisinsight",
    }
    # The majors the data volumes were made by: a new major is a migration, not a tag bump.
    assert services["postgres"]["image"].startswith("postgres:16.")
    assert services["redis"]["image"].startswith("redis:7.")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert services["pgadmin"]["image"].startswith("dpage/pgadmin4")
    assert services["redisinsight"]["image"].startswith("redis/redisinsight")


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("postgres:16.8", True),
        ("postgres:16.8-bookworm", True),
        ("postgres:16", False),
        ("postgres", False),
        ("postgres:latest", False),
        ("redis:7.4.2", True),
        ("redis:7.4.2-alpine", True),
        ("redis:7", False),
        ("redis:7.4", False),
        ("redis:7-alpine", False),
        ("docker.io/library/redis:7.4", False),
        ("dpage/pgadmin4:8.14", True),
        ("dpage/pgadmin4:8", False),
        ("grafana/grafana:11.4.0", True),
        ("grafana/grafana:11.4", False),
        ("grafana/grafana-oss:latest", False),
        ("ghcr.io/joeferner/redis-commander:0.9.1", True),
        ("ghcr.io/joeferner/redis-commander:latest", False),
        ("redis/redisinsight:2.64.1", True),
        ("redis/redisinsight:2.64", False),
        ("localhost:5000/app", False),
        ("localhost:5000/app:1.2.3", True),
        ("redis@sha256:" + "a" * 64, True),
        ("redis:7@sha256:" + "0123456789abcdef" * 4, True),
        ("redis@sha256:abc", False),
    ],
)
def test_is_pinned(image: str, pinned: bool) -> None:
    assert is_pinned(image) is pinned


def test_every_image_is_pinned_to_an_exact_version(services: dict[str, dict[str, Any]]) -> None:
    loose = {name: service.get("image") for name, service in services.items()}
    loose = {name: image for name, image in loose.items() if not is_pinned(str(image))}
    assert not loose, f"images not pinned to an exact release: {loose}"


def test_the_file_says_how_to_upgrade_the_pins() -> None:
    header = COMPOSE_FILE.read_text().split("\nservices:", 1)[0].lower()
    assert "pinned" in header
    assert "upgrade" in header


def long_running(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every service but one-shot jobs, which must say so with `restart: "no"`."""
    return {name: s for name, s in services.items() if str(s.get("restart", "")) != "no"}


def healthcheck_problems(service: dict[str, Any]) -> list[str]:
    check = service.get("healthcheck")
    if not isinstance(check, dict):
        return ["no healthcheck"]
    problems = []
    if check.get("disable", False):
        problems.append("healthcheck disabled")
    test = check.get("test")
    if isinstance(test, str):
        command = test.split()
    elif isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
        command = [str(part) for part in test[1:]]
    else:
        command = []  # missing, ["NONE"] or no CMD/CMD-SHELL form
    if not "".join(command).strip():
        problems.append(f"no test command: {test!r}")
    for key in ("interval", "timeout"):
        if not DURATION.match(str(check.get(key, ""))):
            problems.append(f"{key} missing or not a duration: {check.get(key)!r}")
    if "start_period" in check and not DURATION.match(str(check["start_period"])):
        problems.append(f"start_period not a duration: {check['start_period']!r}")
    retries = check.get("retries")
    if not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 1):
        problems.append(f"retries missing or not a positive integer: {retries!r}")
    if not problems and seconds(str(check["timeout"])) > seconds(str(check["interval"])):
        problems.append("timeout longer than interval")
    return problems


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    checked = long_running(services)
    assert set(checked) >= {
        "postgres",
        "redis",
        "grafana",
        "pgadmin",
        "redis-commander",
        "redisinsight",
    }
    problems = {name: healthcheck_problems(service) for name, service in checked.items()}
    problems = {name: found for name, found in problems.items() if found}
    assert not problems, problems


@pytest.mark.parametrize(
    ("service", "probe"),
    [
        ("grafana", "/api/health"),
        ("pgadmin", "/misc/ping"),
        ("redis-commander", "/redis-commander/bin/healthcheck.js"),
        ("redisinsight", "/api/health"),
    ],
)
def test_tool_healthchecks_probe_the_tool(
    services: dict[str, dict[str, Any]], service: str, probe: str
) -> None:
    test = services[service]["healthcheck"]["test"]
    command = test if isinstance(test, str) else " ".join(str(part) for part in test)
    assert probe in command
    # An HTTP probe asks the port the container listens on (the one published for the host).
    for port in re.findall(r"https?://[^/:\s]+:(\d+)", command):
        assert int(port) in host_ports(services[service]).values(), command


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


def test_service_healthy_waits_on_a_service_with_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for dependency, options in depends_on.items():
            if options.get("condition") == "service_healthy":
                assert not healthcheck_problems(services[dependency]), (name, dependency)


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
