"""What happens between runs: raw data changed behind DVC's back, the alias
moved to a new version, the alias moved to a broken one. Real DVC, Feast
(SQLite online store) and MLflow store; no Docker needed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from werkzeug.test import Client

from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES as STAGES
from pipeline.dataset import CUSTOMERS as schema
from pipeline.registry import mlflow_session, register_model_version
from pipeline.serve import create_app
from pipeline.train import MODEL_CODE
from tests.support import clean_env, make_settings, pipeline_cli, wait_until

pytestmark = pytest.mark.integration


def test_changed_raw_data_is_refused_naming_the_file_until_ingest_restores_it(tmp_path):
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_ROWS="2000")
    pipeline_cli(["ingest"], env)
    part = tmp_path / "data/raw/part-00000.csv"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed after versioning
    part.write_bytes(bytes(data))

    refused = pipeline_cli(["features"], env, check=False)
    assert refused.returncode == 4
    assert "data/raw/part-00000.csv" in refused.stderr and "dvc checkout" in refused.stderr
    assert not (tmp_path / "data/features/features.parquet").exists()

    pipeline_cli(["ingest"], env)  # regenerates the same data: same seed, same bytes
    done = pipeline_cli(["features"], env)
    assert "quarantined" in done.stdout
    assert (tmp_path / "data/features/features.parquet").is_file()


def test_a_stage_without_its_upstream_says_what_to_run(tmp_path):
    proc = pipeline_cli(["train"], clean_env(MLOPS_SHARED_DIR=str(tmp_path)), check=False)
    assert proc.returncode == 3
    assert "run `python -m pipeline feast` first" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one clear line, no traceback


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("shared-swap"), rows=2000)
    run_stages(settings, STAGES)
    return settings


def _register_second_version(settings, weights: dict) -> int:
    """Register another version of the model, with the given weights file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with mlflow_session(settings, schema) as client:
        tmp = Path(settings.shared / "w.json")
        tmp.write_text(json.dumps(weights))
        version = register_model_version(
            client, settings, schema, params={}, metrics={"holdout_rmse": 1.0}, score=(1.0, "holdout"),
            lineage={"mlops.dataset": schema.dataset},
            fingerprint=f"manual-{time.time_ns()}", weights_path=tmp, model_code=MODEL_CODE,
            figure=plt.figure(), coefficients={})
    return int(version.version)


def test_alias_move_swaps_the_model_without_failing_a_request(trained):
    app = create_app(trained, watch=False)
    client = Client(app)
    first = json.loads(client.get("/predict").get_data())
    assert first["model"]["version"] == 1
    weights = {"feature_names": list(first["features"]), "intercept": 1.0,
               "coefficients": [0.0] * len(first["features"])}
    v2 = _register_second_version(trained, weights)

    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def hammer():  # bounded: at most 2000 requests or 30 s
        deadline = time.monotonic() + 30
        c = Client(app)
        while not stop.is_set() and len(seen) < 2000 and time.monotonic() < deadline:
            resp = c.get("/predict")
            seen.append((resp.status_code, json.loads(resp.get_data()).get("model", {}).get("version")))

    thread = threading.Thread(target=hammer)
    thread.start()
    wait_until(lambda: len(seen) >= 50, 30, "requests served by version 1 before the move")
    MlflowClient(trained.tracking_uri, registry_uri=trained.tracking_uri).set_registered_model_alias("mlops-linear", "production", str(v2))
    assert app.watcher.refresh() is True
    moved = len(seen)
    wait_until(lambda: len(seen) >= moved + 50 or not thread.is_alive(), 30, "requests served after the move")
    stop.set()
    thread.join(35)
    assert {status for status, _ in seen} == {200}
    versions = [v for _, v in seen]
    assert versions[0] == 1 and versions[-1] == v2
    assert versions == sorted(versions)  # never back to the old one once swapped
    after = json.loads(client.get("/predict").get_data())
    assert after["prediction"] == pytest.approx(1.0) and after["model"]["version"] == v2


def test_alias_moved_to_a_broken_version_keeps_the_previous_model(trained):
    app = create_app(trained, watch=False)
    client = Client(app)
    serving = json.loads(client.get("/predict").get_data())["model"]["version"]
    broken = _register_second_version(trained, {"feature_names": ["a", "b"], "intercept": 0.0,
                                                "coefficients": [1.0, 2.0, 3.0]})
    MlflowClient(trained.tracking_uri, registry_uri=trained.tracking_uri).set_registered_model_alias("mlops-linear", "production", str(broken))
    assert app.watcher.refresh() is False
    resp = client.get("/predict")
    assert resp.status_code == 200
    assert json.loads(resp.get_data())["model"]["version"] == serving
    ready = json.loads(client.get("/readyz").get_data())
    assert "shape" in ready["model_error"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'mlops_model_loads_total{outcome="failed"} 1.0' in metrics
    assert f"mlops_model_version {float(serving)}" in metrics


def test_alias_moved_to_a_version_whose_artifact_is_missing_keeps_serving(trained):
    registry = MlflowClient(trained.tracking_uri, registry_uri=trained.tracking_uri)
    registry.set_registered_model_alias("mlops-linear", "production", "1")  # a good version first
    app = create_app(trained, watch=False)
    client = Client(app)
    serving = json.loads(client.get("/predict").get_data())["model"]["version"]
    first = json.loads(client.get("/predict").get_data())
    weights = {"feature_names": list(first["features"]), "intercept": 2.0,
               "coefficients": [0.0] * len(first["features"])}
    version = _register_second_version(trained, weights)
    local = Path(registry.get_model_version_download_uri("mlops-linear", str(version)).removeprefix("file://"))
    removed = list(local.rglob("w.json"))  # the weights file _register_second_version logged
    assert removed
    for p in removed:
        p.unlink()  # the artifact store lost the weights
    registry.set_registered_model_alias("mlops-linear", "production", str(version))
    assert app.watcher.refresh() is False
    resp = client.get("/predict")
    assert resp.status_code == 200 and json.loads(resp.get_data())["model"]["version"] == serving
    error = json.loads(client.get("/readyz").get_data())["model_error"]
    assert "weights could not be downloaded" in error and "/" not in error, error  # words, no path
