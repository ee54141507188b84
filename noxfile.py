"""Sessions for mlops-shared-volume.

    nox -s simulate        run the whole pipeline on ./.shared, then serve on 127.0.0.1:8000
    nox -s tests           unit, service and integration tests (Redis through testcontainers)

Every session installs the project pinned by ``constraints.txt``. Arguments after
``--`` are passed through: ``nox -s simulate -- --rows 100000 --seed 1``,
``nox -s tests -- -k predict``.
"""

from __future__ import annotations

import os

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

PYTHON = "3.11"
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
    """Run the test suite; Redis tests need Docker (MLOPS_REDIS_IMAGE picks the image)."""
    install(session, "test")
    session.run("pytest", *session.posargs)
