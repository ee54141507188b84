"""Users' own data sets, declared in one file, through every stage and /predict.

A real public data set that an installed package ships (scikit-learn's diabetes
table, read from the package, never downloaded) and a small hand-written one
with string keys (tests/data/housing) run through `python -m pipeline run` and
the served model; predictions are held to an independent least-squares fit.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support import ROOT, clean_env, pipeline_cli, running_server

pytestmark = pytest.mark.integration

HOUSING = ROOT / "tests" / "data" / "housing" / "housing.yaml"


def post(base: str, payload: dict) -> dict:
    request = urllib.request.Request(f"{base}/predict", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """scikit-learn's diabetes table as a user's CSV, declared with holdout 0 (fit on every row)."""
    from sklearn.datasets import load_diabetes

    folder = tmp_path_factory.mktemp("diabetes")
    frame = load_diabetes(scaled=False, as_frame=True).frame.rename(columns={"target": "progression"})
    frame.insert(0, "patient_id", np.arange(1, len(frame) + 1))
    frame.to_csv(folder / "diabetes.csv", index=False)
    (folder / "diabetes.yaml").write_text(
        "name: diabetes\nsource:\n  path: diabetes.csv\nentity:\n  column: patient_id\n"
        "target: progression\nfeatures: [age, sex, bmi, bp, s1, s2, s3, s4, s5, s6]\nholdout: 0\n")
    return folder / "diabetes.yaml", frame


def test_a_public_data_set_runs_through_every_stage_and_predict(diabetes, tmp_path):
    declaration, frame = diabetes
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_DATASET=str(declaration))
    out = pipeline_cli(["run"], env).stdout
    assert "data set 'diabetes'" in out and "predicts progression of a patient from 10 features" in out
    assert "scored on the training rows (in-sample: holdout is 0)" in out
    train = json.loads((tmp_path / "runs" / "train" / "latest.json").read_text())["outputs"]
    assert train["holdout_rows"] == 0 and train["train_rows"] == len(frame)

    features = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    x, y = frame[features].to_numpy(float), frame["progression"].to_numpy(float)
    design = np.column_stack([np.ones(len(x)), x])
    reference = design @ np.linalg.lstsq(design, y, rcond=None)[0]  # independent: plain SVD on the raw design

    with running_server(env, workers=1) as base:
        served = []
        for start in range(0, len(frame), 200):
            ids = frame["patient_id"].iloc[start:start + 200].tolist()
            answer = post(base, {"instances": [{"patient_id": int(i)} for i in ids]})
            served += [p["prediction"] for p in answer["predictions"]]
        single = get(f"{base}/predict?patient_id=7")
        spec = get(f"{base}/openapi.json")
    assert np.max(np.abs(np.array(served) - reference)) / np.max(np.abs(reference)) < 1e-9
    assert single["patient_id"] == 7 and single["model"]["name"] == "diabetes"
    assert single["features"]["bmi"] == pytest.approx(frame.loc[6, "bmi"])
    params = spec["paths"]["/predict"]["get"]["parameters"]
    assert params[0]["name"] == "patient_id" and params[0]["schema"]["type"] == "integer"
    assert set(spec["components"]["schemas"]["Features"]["required"]) == set(features)


def test_string_keys_an_event_time_and_a_holdout(tmp_path):
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_DATASET=str(HOUSING))
    pipeline_cli(["run"], env)
    records = {s: json.loads((tmp_path / "runs" / s / "latest.json").read_text())["outputs"]
               for s in ("ingest", "train")}
    assert records["ingest"]["entity_type"] == "string"
    frame = pd.read_csv(HOUSING.parent / "housing.csv")
    train = records["train"]
    assert train["train_rows"] + train["holdout_rows"] == len(frame) and train["holdout_rows"] > 0

    from pipeline.train import holdout_mask

    held = holdout_mask(frame["house_id"].to_numpy(), 0.25, seed=42)  # documented: anyone can redo it
    assert held.sum() == train["holdout_rows"]
    fit_rows = frame[~held]
    design = np.column_stack([np.ones(len(fit_rows)), fit_rows[["rooms", "area", "age"]].to_numpy(float)])
    beta = np.linalg.lstsq(design, fit_rows["price"].to_numpy(float), rcond=None)[0]

    latest = frame.sort_values("observed_at").groupby("house_id").last()
    with running_server(env, workers=1) as base:
        one = get(f"{base}/predict?house_id=H-007")
        batch = post(base, {"instances": [{"house_id": "H-001"}, {"house_id": "H-042"}]})
        with pytest.raises(urllib.error.HTTPError) as missing:
            get(f"{base}/predict?house_id=H-999")
    want = beta[0] + latest.loc["H-007", ["rooms", "area", "age"]].to_numpy(float) @ beta[1:]
    assert one["house_id"] == "H-007" and one["prediction"] == pytest.approx(want, rel=1e-9)
    assert [p["house_id"] for p in batch["predictions"]] == ["H-001", "H-042"]
    assert missing.value.code == 404


def test_a_new_declaration_reruns_and_never_keeps_the_old_data_sets_model(diabetes, tmp_path):
    declaration, _ = diabetes
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_DATASET=str(HOUSING),
                    MLOPS_MODEL_NAME="shared-name")
    pipeline_cli(["run"], env)
    out = pipeline_cli(["run"], {**env, "MLOPS_DATASET": str(declaration)}).stdout
    assert "ingest    ok" in out and "train     ok" in out  # a change of inputs: the stages ran again
    assert "alias 'production' -> version 2" in out and "trained on the data set 'housing'" in out
