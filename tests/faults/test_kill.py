"""kill -9 at several points of every stage: the shared volume stays consistent
after each kill, and the next run finishes with the same result as a run that
was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.dag import STAGE_NAMES as STAGES
from pipeline.io import read_record
from tests.support import ROOT, clean_env, pipeline_cli
from tests.faults.checks import assert_consistent

pytestmark = pytest.mark.faults

ROWS, SEED = 20_000, 5
# seconds after the stage took the lock (its body runs from then on)
OFFSETS = (0.0, 0.03, 0.1, 0.3, 0.8, 1.6)


def results(shared) -> dict:
    runs = shared / "runs"
    ingest, features, train = (read_record(runs, s) for s in ("ingest", "features", "train"))
    promote = read_record(runs, "promote")
    return {
        "dvc_hash": ingest.outputs["dvc_hash"],
        "features_md5": features.outputs["features_md5"],
        "quarantined": features.outputs["rows_quarantined"],
        "intercept": round(train.outputs["intercept"], 9),
        "coefficients": {k: round(v, 9) for k, v in train.outputs["coefficients"].items()},
        "holdout_rmse": round(train.outputs["metrics"]["holdout_rmse"], 9),
        "promoted": promote.outputs["alias_version"] is not None,
    }


def kill_during(stage: str, env: dict, offset: float, lock) -> bool:
    """Start the stage, kill -9 it ``offset`` s after it took the lock; True if it was hit."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", stage], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if f"stage {stage} pid={proc.pid}" in lock.read_text():
                break
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    # the kill point: ``offset`` s into the stage body, unless the stage ends first
    kill_at = time.monotonic() + offset
    while proc.poll() is None and time.monotonic() < kill_at:
        time.sleep(0.005)
    hit = proc.poll() is None
    if hit:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return hit


def test_kill_minus_nine_anywhere_loses_nothing(tmp_path_factory, figures):
    reference = tmp_path_factory.mktemp("uninterrupted")
    pipeline_cli(["run", "--rows", str(ROWS), "--seed", str(SEED)],
                 clean_env(MLOPS_SHARED_DIR=str(reference)))

    shared = tmp_path_factory.mktemp("killed")
    env = clean_env(MLOPS_SHARED_DIR=str(shared), MLOPS_ROWS=str(ROWS), MLOPS_SEED=str(SEED))
    lock = shared / ".pipeline.lock"
    hits = {}
    for stage in STAGES:
        hits[stage] = 0
        for offset in OFFSETS:
            if kill_during(stage, env, offset, lock):
                hits[stage] += 1
                assert_consistent(shared)
        pipeline_cli([stage], env)  # finish it, so the next stage has its inputs
        assert_consistent(shared)
    final = pipeline_cli(["run"], env)
    assert "error" not in final.stderr.lower()
    checked = assert_consistent(shared)

    assert results(shared) == results(reference)
    assert all(hits[s] >= 2 for s in STAGES), hits  # every stage was really hit more than once
    figures["kill -9: kill points that hit a running stage"] = sum(hits.values())
    figures["kill -9: kill points by stage"] = hits
    figures["kill -9: files re-read after the kills"] = checked
