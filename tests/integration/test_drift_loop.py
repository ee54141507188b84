"""The monitoring loop on a real pipeline (Feast with its SQLite online store, MLflow's
SQLite store, DVC): batch 0 is trained, promoted and served; batch 1 arrives, first
like batch 0, then with one feature shifted; the monitor tells them apart, feature
by feature; `python -m pipeline retrain` trains on the drifted batch and the
promotion gate decides."""

from __future__ import annotations

import json

import numpy as np
import pytest
from werkzeug.test import Client

from pipeline.cli import run_stages
from pipeline.dataset import CUSTOMERS as schema
from pipeline.io import read_record
from pipeline.retrain import training_stages
from pipeline.serve import create_app
from pipeline.synthetic import NOISE_SD, TRUTH
from tests.support import clean_env, make_settings, pipeline_cli

pytestmark = pytest.mark.integration

ROWS, SEED = 3000, 11
SHIFTED, SHIFT = "monthly_spend", 1.0  # one generated standard deviation (about 141)
AFTER_BATCH_1 = ("ingest", "features", "feast", "monitor")


def monitor_report(settings) -> dict:
    return json.loads((settings.shared / "monitoring" / "report.json").read_text())


def serve_every_customer(settings) -> int:
    """/predict for every customer through the real app, which logs what it served."""
    app = create_app(settings, watch=False)
    web = Client(app)
    ids = list(range(1000, 1000 + ROWS // 5))
    for start in range(0, len(ids), 200):
        resp = web.post("/predict", json={"instances": [{schema.join_key: i} for i in ids[start:start + 200]]})
        assert resp.status_code == 200, resp.get_data()
    assert app.predlog.flush()
    app.predlog.close()
    return len(ids)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    shared = tmp_path_factory.mktemp("drift-loop")
    batch0 = make_settings(shared, rows=ROWS, seed=SEED)
    run_stages(batch0, training_stages())
    served = serve_every_customer(batch0)

    steady = make_settings(shared, rows=ROWS, seed=SEED, synthetic_batch=1)
    run_stages(steady, AFTER_BATCH_1)
    steady_report = monitor_report(steady)

    drifted = make_settings(shared, rows=ROWS, seed=SEED, synthetic_batch=1,
                            synthetic_drift=f"{SHIFTED}={SHIFT}")
    run_stages(drifted, AFTER_BATCH_1)
    drifted_report = monitor_report(drifted)

    env = clean_env(MLOPS_SHARED_DIR=str(shared), MLOPS_ROWS=str(ROWS), MLOPS_SEED=str(SEED),
                    MLOPS_SYNTHETIC_BATCH="1", MLOPS_SYNTHETIC_DRIFT=f"{SHIFTED}={SHIFT}")
    retrained = pipeline_cli(["retrain"], env, timeout=300)
    return {"settings": drifted, "served": served, "steady": steady_report, "drifted": drifted_report,
            "retrain": retrained}


def offline(report: dict, name: str) -> dict:
    return report["offline_features"]["features"][name]


def test_batch_1_is_the_newer_data_the_monitor_compares(loop):
    settings = loop["settings"]
    ingest = read_record(settings.runs_dir, "ingest")
    assert ingest.inputs["batch"] == 1 and ingest.inputs["drift"] == {SHIFTED: SHIFT}
    # every row of batch 1 is newer than what the model was trained on
    assert loop["drifted"]["offline_features"]["rows"] == read_record(settings.runs_dir, "features").outputs["rows_out"]
    assert loop["drifted"]["predictions_logged"] == loop["served"]


def test_a_batch_like_training_drifts_nowhere(loop):
    report = loop["steady"]
    thresholds = report["thresholds"]
    for name in schema.feature_names:
        figures = offline(report, name)
        assert figures["psi"] < thresholds["psi"] and figures["ks"] < thresholds["ks"], (name, figures)
    assert report["drifted_features"] == []


def test_the_shifted_feature_and_only_it_crosses_both_thresholds(loop):
    report = loop["drifted"]
    thresholds = report["thresholds"]
    shifted = offline(report, SHIFTED)
    assert shifted["psi"] > thresholds["psi"] and shifted["ks"] > thresholds["ks"], shifted
    assert shifted["mean_shift_sigmas"] == pytest.approx(SHIFT, abs=0.15)
    for name in set(schema.feature_names) - {SHIFTED}:
        figures = offline(report, name)
        assert figures["psi"] < thresholds["psi"] and figures["ks"] < thresholds["ks"], (name, figures)
    # what /predict served came before the drift: the log's figures stay below for every feature
    for name in schema.feature_names:
        logged = report["features"][name]
        assert logged["psi"] < thresholds["psi"] and logged["ks"] < thresholds["ks"], (name, logged)
    assert report["drifted_features"] == [SHIFTED]


def test_retrain_trains_on_the_drifted_batch_and_the_gate_decides(loop):
    settings, proc = loop["settings"], loop["retrain"]
    train = read_record(settings.runs_dir, "train").outputs
    promote = read_record(settings.runs_dir, "promote").outputs
    assert train["model_version"] == 2
    # The drift is a covariate shift: monthly_spend moved, the truth that makes the target
    # did not (ingest draws the target from the moved values). So the retrained model
    # recovers the same coefficients, and both versions' holdout RMSE is the noise's
    # (NOISE_SD, 5): the candidate is no worse than version 1 beyond the 5% tolerance,
    # and the gate promotes it.
    assert train["coefficients"][SHIFTED] == pytest.approx(TRUTH.coefficients[SHIFTED], abs=0.02)
    for rmse in (promote["candidate_rmse"], promote["current_rmse"]):
        assert rmse == pytest.approx(NOISE_SD, rel=0.1)
    assert promote["promote"] is True and promote["alias_version"] == 2, promote
    assert f"is within 5% of the current {promote['current_rmse']:.4f} (version 1)" in promote["reason"]
    assert "retrain: version 2 promoted (RMSE" in proc.stdout + proc.stderr
    assert np.isfinite(promote["candidate_rmse"])
