"""The compose twin on a declared data set: tests/data/housing (string keys, an
event time, a column left out) mounted read-only as MLOPS_DATASET_DIR, through every
stage container, then /predict by its own key, checked against the local simulator."""

from __future__ import annotations

import json
import urllib.request

import pytest

from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES
from pipeline.io import read_record
from tests.e2e.test_compose import serving_stack
from tests.support import ROOT, make_settings

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

HOUSING = ROOT / "tests" / "data" / "housing"


@pytest.fixture(scope="module")
def housing_stack():
    with serving_stack("mlops-e2e-housing", MLOPS_DATASET_DIR=str(HOUSING),
                       MLOPS_DATASET_FILE="housing.yaml") as stack:
        yield stack


def test_a_declared_data_set_runs_in_compose_as_it_does_locally(housing_stack, tmp_path):
    compose, serve = housing_stack
    for stage in STAGE_NAMES:
        record = json.loads(compose.read(f"/shared/runs/{stage}/latest.json"))
        assert record["status"] == "ok", (stage, record["message"])
    remote = json.loads(compose.read("/shared/runs/train/latest.json"))["outputs"]
    assert remote["dataset"] == "housing" and remote["model_name"] == "housing"

    local = make_settings(tmp_path, dataset=HOUSING / "housing.yaml", model_name=None, seed=42)  # compose: 42
    run_stages(local, STAGE_NAMES)
    mine = read_record(local.runs_dir, "train").outputs
    assert remote["intercept"] == pytest.approx(mine["intercept"], rel=1e-9)
    for name, value in mine["coefficients"].items():
        assert remote["coefficients"][name] == pytest.approx(value, rel=1e-9), name

    with urllib.request.urlopen(f"{serve}/predict?house_id=H-007", timeout=10) as resp:
        answer = json.loads(resp.read())
    assert answer["house_id"] == "H-007" and answer["model"]["name"] == "housing"
    features = answer["features"]
    want = mine["intercept"] + sum(mine["coefficients"][n] * features[n] for n in features)
    assert answer["prediction"] == pytest.approx(want, rel=1e-9)
