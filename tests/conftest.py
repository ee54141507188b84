"""Shared fixtures: a real pipeline run on a temporary shared folder, real Redis.

Redis comes from testcontainers with the image named by ``MLOPS_REDIS_IMAGE``
(default: the official ``redis:7-bookworm``; CI builds a stand-in from Debian
packages with ``scripts/build_offline_images.sh``). Without a Docker engine the
Redis tests are skipped with the reason, unless ``MLOPS_REQUIRE_DOCKER=1``
(set by CI), which turns the skip into a failure.

The helpers (ports, readiness waits, the server, the container, a clean
environment) live in ``tests/support.py``, shared with the benchmarks; they are
imported here so tests that import them from ``tests.conftest`` keep working.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES as STAGES
from pipeline.settings import Settings
from tests import support
from tests.support import (  # noqa: F401  (re-exported for the tests that import them from here)
    REDIS_IMAGE,
    ROOT,
    clean_env,
    docker_available,
    free_port,
    make_settings,
    pipeline_cli,
    running_server,
    wait_http,
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MLOPS_") and key not in ("MLOPS_REDIS_IMAGE", "MLOPS_REQUIRE_DOCKER"):
            monkeypatch.delenv(key)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session")
def sqlite_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The whole DAG (but serve) run once with Feast's SQLite online store."""
    settings = make_settings(tmp_path_factory.mktemp("shared-sqlite"))
    run_stages(settings, STAGES)
    return settings


def redis_container(host_port: int | None = None, durable: bool = False):
    """:func:`tests.support.redis_container`, skipped with the reason where no Docker
    engine answers, unless MLOPS_REQUIRE_DOCKER=1 (CI), which makes that a failure."""
    try:
        return support.redis_container(host_port, durable)
    except support.DockerUnavailable as exc:
        if os.environ.get("MLOPS_REQUIRE_DOCKER") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    container, password = redis_container()
    with container:
        yield support.redis_url(container, password)


@pytest.fixture
def durable_redis() -> Iterator[tuple[object, str]]:
    """``(container, password)``: a Redis whose data outlives a restart of its
    container, on a fixed loopback port (so a restart keeps the port)."""
    container, password = redis_container(host_port=free_port(), durable=True)
    with container:
        yield container, password


# --------------------------------------------------------------- figures
# Fault and fuzz tests record what they measured (kill points survived, inputs
# tried, outage detection and recovery times); the session prints them and
# writes .reports/reliability.json for the reliability docs. Only figures that
# can differ between passing runs belong here: a count a test asserts to be
# zero is the test's verdict, not a measurement.
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, object]:
    return FIGURES


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES:
        return
    import json

    terminalreporter.section("reliability figures")
    for key, value in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{key}: {value}")
    out = ROOT / ".reports"
    out.mkdir(exist_ok=True)
    path = out / "reliability.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **FIGURES}, indent=2, sort_keys=True) + "\n")
