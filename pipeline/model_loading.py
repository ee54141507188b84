"""Loading a registered version for serving: its format checked, its weights read as data, nothing of it run.

Serving trusts no model file. It loads only this project's own format: an MLflow
"model from code" whose code is pipeline/mlflow_model.py and whose one artifact is
the weights JSON. It reads the version's MLmodel (YAML, parsed as data), checks
that it is that format, downloads the weights file alone, and builds the
LinearModel from the *installed* package: the code stored with the version is
never run, and nothing is unpickled (no mlflow.pyfunc.load_model, which would
unpickle a cloudpickled python_model or import a stored loader). Anything else
is refused, counted as mlops_model_loads_total{outcome="refused"} and logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from pipeline.lakehouse import s3_environment
from pipeline.registry import open_client
from pipeline.settings import Settings

log = logging.getLogger(__name__)

CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
MODEL_CODE_NAME = "mlflow_model.py"


class LoadedModel:
    """A registered version, loaded and checked; ``predict`` takes rows in schema order."""

    __slots__ = ("name", "version", "alias", "python_model")

    def __init__(self, name: str, version: int, alias: str, python_model: Any) -> None:
        self.name, self.version, self.alias = name, version, alias
        self.python_model = python_model  # pipeline/mlflow_model.py's LinearModel, built from the weights

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.python_model.predict_array(features)


class ModelRefused(Exception):
    """A version that is not this project's model format: never loaded, never retried.
    ``str()`` is the public reason; details go to the log."""


class ModelLoadFailed(Exception):
    """A version of the right format that could not be loaded now (artifacts missing,
    the tracking server down, bad weights): retried with back-off. ``str()`` is the
    public reason."""


def check_model(name: str, version: int, alias: str, inner: Any) -> LoadedModel:
    """Refuse a model that answers a zero row with something other than one finite number."""
    names = list(getattr(inner, "feature_names", []))
    probe = inner.predict_array(np.zeros((1, len(names))))
    if probe.shape != (1,) or not np.isfinite(probe).all():
        raise ModelLoadFailed(f"version {version} does not answer a zero row with one finite number")
    return LoadedModel(name, version, alias, inner)


def weights_path(pyfunc: dict) -> str | None:
    """``artifacts/<name>.json``, the one artifact of this project's format, else None."""
    import re

    artifacts = pyfunc.get("artifacts")
    if not isinstance(artifacts, dict) or set(artifacts) != {"weights"} or not isinstance(artifacts["weights"], dict):
        return None
    path = str(artifacts["weights"].get("path", ""))
    folder, _, name = path.partition("/")
    if folder != "artifacts" or not re.fullmatch(r"[A-Za-z0-9_.-]+\.json", name) or name.startswith("."):
        return None
    return path


def check_format(mlmodel: dict, version: int) -> None:
    """Refuse (:class:`ModelRefused`) an MLmodel that is not this project's format."""
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    problems = []
    if not isinstance(pyfunc, dict):
        problems.append("no python_function flavor")
    else:
        if set(flavors) != {"python_function"}:
            problems.append(f"other flavors {sorted(set(flavors) - {'python_function'})}")
        if "python_model" in pyfunc:
            problems.append("a pickled python_model")
        if pyfunc.get("loader_module") != CODE_LOADER:
            problems.append(f"loader {pyfunc.get('loader_module')!r}")
        if Path(str(pyfunc.get("model_code_path", ""))).name != MODEL_CODE_NAME:
            problems.append("model code other than mlflow_model.py")
        if weights_path(pyfunc) is None:
            problems.append("artifacts other than one weights JSON file")
        if pyfunc.get("code"):
            problems.append("bundled code")
    if problems:
        log.error("serve: version %s is not this project's model format (%s); refused, nothing of it was run",
                  version, "; ".join(problems))
        raise ModelRefused(f"version {version} is not this project's model format (weights as data and "
                           "pipeline/mlflow_model.py); it was not loaded")


def load_model_version(name: str, version: int, alias: str, tracking_uri: str,
                       settings: Settings | None = None) -> LoadedModel:
    """Check a registered version's format, download its weights JSON only, and build
    the model from the installed package's code (see the module's docstring); ``settings``
    of the lakehouse: from the object store, its keys in the environment meanwhile."""
    if settings is not None:
        with s3_environment(settings):
            return load_model_version(name, version, alias, tracking_uri)
    import tempfile

    import yaml

    from pipeline.mlflow_model import InvalidWeights, LinearModel

    client = open_client(tracking_uri)
    try:
        source = client.get_model_version_download_uri(name, str(version)).rstrip("/")
        with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
            mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/MLmodel", dst_path=tmp,
                                                               tracking_uri=tracking_uri))
            text = mlmodel.read_text()
    except Exception as exc:
        log.error("serve: cannot read the MLmodel of version %s: %s: %s", version, type(exc).__name__, exc)
        raise ModelLoadFailed(f"version {version}'s model description could not be downloaded") from exc
    try:
        description = yaml.safe_load(text)  # data only: safe_load builds no objects
    except yaml.YAMLError as exc:
        log.error("serve: version %s has an MLmodel that is not YAML: %s", version, exc)
        raise ModelRefused(f"version {version}'s model description is not readable") from None
    check_format(description, version)
    try:
        path = weights_path(description["flavors"]["python_function"])
        with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
            weights = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{path}",
                                                               dst_path=tmp, tracking_uri=tracking_uri))
            payload = json.loads(weights.read_text())
    except Exception as exc:
        log.error("serve: cannot read the weights of version %s: %s: %s", version, type(exc).__name__, exc)
        raise ModelLoadFailed(f"version {version}'s weights could not be downloaded or read") from exc
    try:
        model = LinearModel.from_weights(payload)
    except InvalidWeights as exc:
        log.error("serve: version %s has unusable weights: %s", version, exc)
        raise ModelLoadFailed(f"version {version}'s weights have the wrong shape or values") from exc
    return check_model(name, version, alias, model)
