"""Serving runs no code that comes with a model version. A version whose
python_model is cloudpickled (its unpickling and its load both write a marker
file) is refused, counted and logged, and the previous version keeps serving;
the model code stored with one of this project's own versions is never run
either: serving builds the model from the installed package and the weights
JSON. Real pipeline run, real MLflow store (SQLite); no Docker needed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from werkzeug.test import Client

from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES as STAGES
from pipeline.dataset import CUSTOMERS as schema
from pipeline.registry import mlflow_session, register_model_version
from pipeline.serve import create_app
from pipeline.train import MODEL_CODE
from tests.support import make_settings

pytestmark = pytest.mark.integration


class Pickled(mlflow.pyfunc.PythonModel):
    """A model MLflow stores as a cloudpickle: unpickling it or loading it runs code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state) -> None:
        Path(state["marker"]).write_text("unpickled")
        self.__dict__.update(state)

    def load_context(self, context) -> None:
        Path(self.marker).write_text("loaded")

    def predict(self, context, model_input, params=None):
        return np.full(len(model_input), 1e6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("shared-trust"), rows=2000)
    run_stages(settings, STAGES)
    return settings


def registry(settings) -> MlflowClient:
    return MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)


def body(resp) -> dict:
    return json.loads(resp.get_data())


def test_a_pickled_model_is_refused_and_never_run(trained, tmp_path, caplog):
    marker = tmp_path / "ran"
    app = create_app(trained, watch=False)
    client = Client(app)
    serving = body(client.get("/predict"))["model"]["version"]
    with mlflow_session(trained, schema) as mlc:
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=Pickled(str(marker)))
        version = int(mlc.create_model_version(trained.model_name, source=info.model_uri,
                                               model_id=info.model_id).version)
    marker.unlink(missing_ok=True)  # MLflow's log_model itself loads the model once, here in the test
    registry(trained).set_registered_model_alias(trained.model_name, trained.model_alias, str(version))

    assert app.watcher.refresh() is False
    assert app.watcher.refresh() is False  # and it is not tried again
    assert not marker.exists(), marker.read_text()
    resp = client.get("/predict")
    assert resp.status_code == 200 and body(resp)["model"]["version"] == serving
    ready = body(client.get("/readyz"))
    assert ready["ready"] and "not this project's model format" in ready["model_error"]
    assert 'mlops_model_loads_total{outcome="refused"} 1.0' in client.get("/metrics").get_data(as_text=True)
    assert any("pickled python_model" in r.getMessage() for r in caplog.records)
    assert not marker.exists()


def test_the_code_stored_with_a_version_is_not_what_runs(trained, tmp_path):
    marker = tmp_path / "ran"
    registry(trained).set_registered_model_alias(trained.model_name, trained.model_alias, "1")
    app = create_app(trained, watch=False)
    client = Client(app)
    features = list(body(client.get("/predict"))["features"])
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"feature_names": features, "intercept": 7.0,
                                   "coefficients": [0.0] * len(features)}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with mlflow_session(trained, schema) as mlc:
        version = int(register_model_version(
            mlc, trained, schema, params={}, metrics={"holdout_rmse": 1.0}, score=(1.0, "holdout"),
            lineage={"mlops.dataset": schema.dataset}, fingerprint=f"trust-{time.time_ns()}",
            weights_path=weights, model_code=MODEL_CODE, figure=plt.figure(), coefficients={}).version)
    stored = Path(registry(trained).get_model_version_download_uri(trained.model_name, str(version))
                  .removeprefix("file://")) / "mlflow_model.py"
    assert stored.is_file()
    stored.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                      + stored.read_text().replace("self.intercept + ", "1e6 + self.intercept + "))
    registry(trained).set_registered_model_alias(trained.model_name, trained.model_alias, str(version))

    assert app.watcher.refresh() is True
    answer = body(client.get("/predict"))
    assert answer["model"]["version"] == version and answer["prediction"] == pytest.approx(7.0)
    assert not marker.exists()
