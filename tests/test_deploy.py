"""Tests of the deployment files: the compose file, the Dockerfile and its ignores.

No Docker engine is needed. ``docker-compose config`` validates the compose
file where the binary is installed; the rest reads the files as data.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from workflows.models import SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.temporal.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    """Return the compose file's services, parsed."""
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    services: dict[str, dict[str, Any]] = document["services"]

    return services


def script_of(service: dict[str, Any]) -> str:
    """Return the shell script a one-shot service runs."""
    command = service["command"]

    return command if isinstance(command, str) else "\n".join(command)


def test_compose_file_passes_docker_compose_config() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose is not on PATH; install it (apt-get install "
            "docker-compose) to validate the compose file"
        )

    result = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr


def test_compose_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    """Every image names a version tag, and none is ``latest``."""
    images = {name: service["image"] for name, service in services.items()}

    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: image {image!r} has no tag"
        assert "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
        assert re.search(r"\d", tag), f"{name}: tag {tag!r} names no version"


def test_compose_temporal_images_share_one_version(
    services: dict[str, dict[str, Any]],
) -> None:
    server = services["temporal"]["image"].rpartition(":")[2]
    tools = {
        services[name]["image"].rpartition(":")[2]
        for name in ("temporal-schema", "temporal-setup")
    }

    assert tools == {server}


def test_compose_server_is_not_auto_setup(services: dict[str, dict[str, Any]]) -> None:
    images = [service["image"] for service in services.values()]

    assert services["temporal"]["image"].startswith("temporalio/server:")
    assert not [image for image in images if "auto-setup" in image]
    assert services["temporal"]["environment"]["DB"] == "postgres12"


def test_compose_builds_webhook_and_worker_from_the_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, command in [
        ("mirrorflow-webhook", ["webhook", "--host", "0.0.0.0", "--port", "8080"]),
        ("mirrorflow-worker", ["worker"]),
    ]:
        service = services[name]
        build = service["build"]
        assert build["context"] == "."
        assert build["dockerfile"] == "Dockerfile"
        assert service["command"] == command
        assert "healthcheck" in service
        environment = service["environment"]
        assert environment["MIRRORFLOW_TEMPORAL_ADDRESS"] == "temporal:7233"
        for variable in (
            "MIRRORFLOW_STORAGE_URL",
            "MIRRORFLOW_DATABASE_URL",
            "MIRRORFLOW_MIRROR_ROOT_URL",
            "MIRRORFLOW_CALLBACK_URL",
        ):
            assert variable in environment, f"{name} lacks {variable}"


def test_compose_registers_every_search_attribute(
    services: dict[str, dict[str, Any]],
) -> None:
    """The setup job registers each of mirrorflow's keywords on its own."""
    script = script_of(services["temporal-setup"])

    assert "search-attribute create" in script
    assert "--type Keyword" in script
    for key in SEARCH_ATTRIBUTES:
        assert re.search(rf"\b{key.name}\b", script), f"{key.name} not registered"
    assert "namespace create" in script
    assert "--retention" in script


def test_compose_sets_up_both_schemas(services: dict[str, dict[str, Any]]) -> None:
    script = script_of(services["temporal-schema"])

    assert services["temporal-schema"]["image"].startswith("temporalio/admin-tools:")
    assert "temporal-sql-tool" in script
    assert "migrate temporal temporal" in script
    assert "migrate temporal_visibility visibility" in script


def test_compose_starts_in_dependency_order(
    services: dict[str, dict[str, Any]],
) -> None:
    def waits_for(name: str) -> dict[str, str]:
        return {
            dependency: condition["condition"]
            for dependency, condition in services[name]["depends_on"].items()
        }

    assert waits_for("temporal-schema") == {"postgresql": "service_healthy"}
    assert waits_for("temporal") == {
        "temporal-schema": "service_completed_successfully"
    }
    assert waits_for("temporal-setup") == {"temporal": "service_healthy"}
    for name in ("mirrorflow-webhook", "mirrorflow-worker"):
        assert waits_for(name) == {"temporal-setup": "service_completed_successfully"}


def test_dockerfile_runs_mirrorflow_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)

    assert bases
    assert all(base.startswith("python:3.11-slim") for base in bases)
    assert "pip install ." in text
    assert users
    assert users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["mirrorflow"\]$', text, flags=re.MULTILINE)


def test_dockerignore_keeps_secrets_and_environments_out() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }

    assert {".env", ".git/", ".venv/", "data/"} <= patterns
    assert "pyproject.toml" not in patterns
    assert "README.md" not in patterns
