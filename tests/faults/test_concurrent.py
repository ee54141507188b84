"""Two runs at once on the same shared folder: one waits for the other (or,
past its lock timeout, refuses with a clear message); neither corrupts the Feast
registry, the DVC cache or the MLflow store."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline.io import file_md5, read_record
from tests.support import ROOT, clean_env, make_settings, wait_until
from tests.faults.checks import assert_consistent

pytestmark = pytest.mark.faults


def start(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def dvc_status(shared) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=shared, capture_output=True,
                          text=True, timeout=120, env=clean_env(DVC_NO_ANALYTICS="1"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_two_runs_at_once_take_turns_and_leave_one_consistent_state(tmp_path):
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path))
    first, second = start(env, "--rows", "6000"), start(env, "--rows", "9000")
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    assert any("waiting for another run" in out for out, _ in outs)

    settings = make_settings(tmp_path)
    features, train = read_record(settings.runs_dir, "features"), read_record(settings.runs_dir, "train")
    ingest = read_record(settings.runs_dir, "ingest")
    # whichever ran last, its records describe the files on the volume, end to end
    assert features.outputs["features_md5"] == file_md5(settings.features_path)
    assert features.outputs["raw_dvc_hash"] == ingest.outputs["dvc_hash"]
    assert train.inputs["features_md5"] == features.outputs["features_md5"]
    assert train.outputs["rows"] == features.outputs["rows_out"]
    assert "up to date" in dvc_status(tmp_path)
    assert_consistent(tmp_path)
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    versions = client.search_model_versions("name = 'mlops-linear'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # one per data set, none torn


def test_a_run_that_cannot_get_the_lock_in_time_refuses_and_changes_nothing(tmp_path):
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path))
    holder = start(env, "--rows", "20000")
    lock = tmp_path / ".pipeline.lock"
    wait_until(lambda: lock.exists() and "run (" in lock.read_text(), 60, "the first run holds the lock")
    impatient = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "--rows", "500"],
                               env={**env, "MLOPS_LOCK_TIMEOUT_SECONDS": "1"}, cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    out, err = holder.communicate(timeout=600)
    assert holder.returncode == 0, err
    assert impatient.returncode == 5
    assert "another pipeline run" in impatient.stderr and "MLOPS_LOCK_TIMEOUT_SECONDS" in impatient.stderr
    assert read_record(tmp_path / "runs", "ingest").outputs["rows"] == 20000
