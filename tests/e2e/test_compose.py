"""The compose twin end to end (``nox -s e2e_compose``): every stage in its own
container on one named volume, then /predict, /metrics and the registry over
real HTTP on 127.0.0.1, checked against the local simulator."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import run_stages
from pipeline.dag import IDEMPOTENT
from pipeline.dag import STAGE_NAMES as STAGES
from pipeline.io import read_record
from pipeline.metrics import FLUSH_SECONDS
from tests.support import ROOT, docker_available, free_port, make_settings

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

PROJECT = "mlops-e2e"
ROWS, SEED = 4000, 42
ONE_SHOT = ("init", *STAGES)


class Compose:
    def __init__(self, env: dict[str, str], project: str = PROJECT) -> None:
        self.env, self.project = env, project

    def __call__(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", "compose", "-p", self.project, *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}\n{self.failing_logs()}")
        return proc

    def states(self) -> dict[str, tuple[str, int]]:
        out = self("ps", "--all", "--format", "json", check=False).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return {r["Service"]: (r["State"], int(r["ExitCode"])) for r in rows}

    def failing_logs(self) -> str:
        bad = [s for s, (state, code) in self.states().items() if state == "exited" and code != 0]
        logs = []
        for service in bad or ["serve"]:
            proc = subprocess.run(["docker", "compose", "-p", self.project, "logs", "--tail", "40", service],
                                  cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
            logs.append(f"--- last log lines of {service} ---\n{proc.stdout}{proc.stderr}")
        return "\n".join(logs)

    def read(self, path: str) -> str:
        """A file from the named volume, read by a throwaway container of the same image."""
        return self("run", "--rm", "--no-deps", "-T", "shell", "cat", path).stdout

    def ls(self, path: str) -> list[str]:
        return self("run", "--rm", "--no-deps", "-T", "shell", "sh", "-c", f"ls {path}").stdout.split()


@contextlib.contextmanager
def serving_stack(project: str, **variables: str) -> Iterator[tuple[Compose, str]]:
    """``docker compose up`` to a ready serve on free loopback ports (``variables``: more
    for compose); yields the project and serve's URL; ``down --volumes`` after."""
    ok, reason = docker_available()
    if not ok:
        pytest.fail(reason)  # e2e runs only when asked for: a missing engine is an error
    port = str(free_port())
    compose = Compose({**os.environ, "MLOPS_SERVE_PORT": port, "MLOPS_MLFLOW_PORT": str(free_port()),
                       **variables}, project=project)
    compose("down", "--volumes", "--remove-orphans", check=False)
    try:
        compose("up", "--detach", "--pull", "never", "--wait", "serve")
        yield compose, f"http://127.0.0.1:{port}"
    except BaseException:
        print(compose.failing_logs())
        raise
    finally:
        compose("--profile", "debug", "down", "--volumes", "--remove-orphans", check=False)


@pytest.fixture(scope="module")
def stack():
    with serving_stack(PROJECT, MLOPS_ROWS=str(ROWS), MLOPS_SEED=str(SEED)) as (compose, serve):
        yield compose, serve, f"http://127.0.0.1:{compose.env['MLOPS_MLFLOW_PORT']}"


MLFLOW_USER = "mlops"


def mlflow_password() -> str:
    """The compose MLflow's password, from the secret file nox made (never printed)."""
    path = Path(os.environ.get("MLOPS_MLFLOW_PASSWORD_FILE", ROOT / ".secrets" / "mlflow_password"))
    return path.read_text().strip()


def get(url: str, auth: bool = False) -> tuple[int, str]:
    """GET; ``auth`` logs in to the tracking server as the pipeline does (basic auth)."""
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{MLFLOW_USER}:{mlflow_password()}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_every_stage_container_exited_zero(stack):
    compose, _, _ = stack
    states = compose.states()
    for service in ONE_SHOT:
        assert states[service] == ("exited", 0), (service, states[service], compose.failing_logs())
    for service in ("redis", "mlflow", "serve"):
        assert states[service][0] == "running"


def test_run_records_are_on_the_volume(stack):
    compose, _, _ = stack
    assert sorted(compose.ls("/shared/runs")) == sorted(STAGES)
    for stage in STAGES:
        record = json.loads(compose.read(f"/shared/runs/{stage}/latest.json"))
        assert record["status"] == "ok", record
    assert compose.ls("/shared/data/raw.dvc") == ["/shared/data/raw.dvc"]


def test_predict_answers_with_the_production_model_and_metrics_count_it(stack):
    compose, serve, _ = stack
    promote = json.loads(compose.read("/shared/runs/promote/latest.json"))
    status, text = get(f"{serve}/predict")
    answer = json.loads(text)
    assert status == 200 and answer["customer_id"] == 1000
    assert answer["model"] == {"name": "mlops-linear", "version": promote["outputs"]["alias_version"],
                               "alias": "production"}
    # two workers: the other one's counts reach /metrics within about FLUSH_SECONDS
    deadline, counted = time.monotonic() + 3 * FLUSH_SECONDS, 0.0
    while counted < 1 and time.monotonic() < deadline:
        _, metrics = get(f"{serve}/metrics")
        counted = next((float(l.split()[-1]) for l in metrics.splitlines() if l.startswith(
            'mlops_http_requests_total{method="GET",route="/predict",status="200"}')), 0.0)
        time.sleep(0.1)
    assert counted >= 1


def test_compose_trains_the_same_model_as_the_local_simulator(stack, tmp_path):
    compose, _, _ = stack
    remote = json.loads(compose.read("/shared/runs/train/latest.json"))["outputs"]
    local_settings = make_settings(tmp_path, rows=ROWS, seed=SEED)
    run_stages(local_settings, STAGES)
    local = read_record(local_settings.runs_dir, "train").outputs
    assert remote["rows"] == local["rows"]
    assert remote["intercept"] == pytest.approx(local["intercept"], rel=1e-9)
    for name, value in local["coefficients"].items():
        assert remote["coefficients"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert remote["metrics"]["holdout_rmse"] == pytest.approx(local["metrics"]["holdout_rmse"], rel=1e-9)


def test_mlflow_server_holds_the_run_and_serves_the_ui_on_loopback(stack):
    compose, _, mlflow_url = stack
    status, page = get(f"{mlflow_url}/", auth=True)
    assert status == 200 and "MLflow" in page
    _, body = get(f"{mlflow_url}/api/2.0/mlflow/registered-models/get?name=mlops-linear", auth=True)
    model = json.loads(body)["registered_model"]
    assert [a["alias"] for a in model.get("aliases", [])] == ["production"]


def test_mlflow_refuses_writes_without_a_login(stack):
    _, _, mlflow_url = stack
    body = json.dumps({"name": "intruder"}).encode()
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"mlops:wrong").decode()}):
        request = urllib.request.Request(f"{mlflow_url}/api/2.0/mlflow/registered-models/create", data=body,
                                         headers={"Content-Type": "application/json", **headers}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (401, 403), headers.keys()
    _, listed = get(f"{mlflow_url}/api/2.0/mlflow/registered-models/search", auth=True)
    assert [m["name"] for m in json.loads(listed)["registered_models"]] == ["mlops-linear"]


def test_a_second_up_of_the_stages_does_no_new_work(stack):
    compose, serve, mlflow_url = stack
    compose("up", "--detach", "--pull", "never", *STAGES)
    compose("wait", *STAGES)
    states = compose.states()
    for stage in STAGES:
        assert states[stage] == ("exited", 0), compose.failing_logs()
    for stage in IDEMPOTENT:  # the monitor looks again every time: time is one of its inputs
        record = json.loads(compose.read(f"/shared/runs/{stage}/latest.json"))
        assert record["status"] == "skipped", (stage, record["message"])
    _, body = get(f"{mlflow_url}/api/2.0/mlflow/model-versions/search?filter=name%3D%27mlops-linear%27", auth=True)
    assert [v["version"] for v in json.loads(body)["model_versions"]] == ["1"]
    assert json.loads(get(f"{serve}/predict")[1])["model"]["version"] == 1


def test_mlflow_down_during_train_fails_clearly_and_a_rerun_finishes(stack):
    compose, serve, mlflow_url = stack
    versions = lambda: sorted(v["version"] for v in json.loads(get(
        f"{mlflow_url}/api/2.0/mlflow/model-versions/search?filter=name%3D%27mlops-linear%27", auth=True)[1])
        ["model_versions"])
    compose("stop", "mlflow")
    try:
        # a new seed: new inputs, so train has work to do and must reach the tracking server
        failed = compose("run", "--rm", "--no-deps", "-e", "MLOPS_SEED=43", "train", check=False, timeout=300)
    finally:
        compose("up", "--detach", "--pull", "never", "--wait", "mlflow")
    output = failed.stdout + failed.stderr
    assert failed.returncode == 6, output[-2000:]
    assert "MLflow tracking at http://mlflow:5000 is unreachable" in output
    assert "nothing was registered and no alias moved" in output
    assert "Traceback" not in output
    assert versions() == ["1"]  # no half-registered version
    alias = json.loads(get(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?name=mlops-linear&alias=production",
                           auth=True)[1])
    assert alias["model_version"]["version"] == "1"

    compose("run", "--rm", "--no-deps", "-e", "MLOPS_SEED=43", "train")  # the re-run finishes the job
    compose("run", "--rm", "--no-deps", "-e", "MLOPS_SEED=43", "promote")
    assert versions() == ["1", "2"]
    assert json.loads(compose.read("/shared/runs/promote/latest.json"))["inputs"]["candidate_version"] == 2
