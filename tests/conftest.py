"""Shared fixtures: a real pipeline run on a temporary shared folder, real Redis.

Redis comes from testcontainers with the image named by ``MLOPS_REDIS_IMAGE``
(default: the official ``redis:7-bookworm``; CI builds a stand-in from Debian
packages with ``scripts/build_offline_images.sh``). Without a Docker engine the
Redis tests are skipped with the reason, unless ``MLOPS_REQUIRE_DOCKER=1``
(set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES as STAGES
from pipeline.settings import Settings

REDIS_IMAGE = os.environ.get("MLOPS_REDIS_IMAGE", "redis:7-bookworm")
ROOT = Path(__file__).resolve().parent.parent


def make_settings(shared: Path, **overrides) -> Settings:
    """Settings for a test: only what the test gives, never the caller's MLOPS_* env."""
    base = {"shared_dir": shared, "rows": 3000, "seed": 7, "lock_timeout_seconds": 30,
            "mlflow_tracking_uri": None, "redis_url": None, "redis_password": None,
            "redis_password_file": None}
    base.update(overrides)
    return Settings(**base)


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


def docker_available() -> tuple[bool, str]:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return True, ""
    except Exception as exc:
        return False, f"no Docker engine answers ({type(exc).__name__}); start dockerd to run the Redis tests"


def redis_container(host_port: int | None = None, durable: bool = False):
    """A real Redis with a password (testcontainers), published on 127.0.0.1 only.

    Skipped with the reason where no Docker engine answers, unless
    MLOPS_REQUIRE_DOCKER=1 (CI), which makes that a failure. ``durable``: an
    append-only file, so the data outlives a restart of the container.
    """
    ok, reason = docker_available()
    if not ok:
        if os.environ.get("MLOPS_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    # Talk to the container through its loopback-published port, never the bridge.
    # (testcontainers thinks it runs inside a container here and would pick the gateway)
    os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    from testcontainers.community.redis import RedisContainer

    password = secrets.token_hex(16)
    container = RedisContainer(REDIS_IMAGE, password=password)
    container.ports = {"6379/tcp": ("127.0.0.1", host_port)}
    if durable:
        container.with_command(f"redis-server --requirepass {password} --appendonly yes "
                               "--appendfsync always --dir /tmp")
    return container, password


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    container, password = redis_container()
    with container:
        port = container.get_exposed_port(6379)
        yield f"redis://:{password}@127.0.0.1:{port}/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextlib.contextmanager
def running_server(env: dict[str, str], workers: int = 2) -> Iterator[str]:
    """``python -m pipeline serve`` (granian) on a free loopback port, ready; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port),
                             "--workers", str(workers)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", proc=proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def pipeline_cli(args: list[str], env: dict[str, str], timeout: float = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_"))}
    env.update(extra)
    return env


# --------------------------------------------------------------- figures
# Fault and fuzz tests record what they measured (kill points survived, inputs
# tried, 5xx seen, outage detection and recovery times); the session prints
# them and writes .reports/reliability.json for the README's reliability section.
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
