"""MLflow tracking and model registry: the one place that talks to MLflow.

Local runs use a SQLite backend store and artifacts on the shared volume; the
compose twin and the chart point ``MLFLOW_TRACKING_URI`` at a tracking server
that proxies artifacts.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from pipeline.errors import TrackingUnavailable
from pipeline.lakehouse import s3_environment
from pipeline.schema import Schema
from pipeline.settings import Settings

log = logging.getLogger(__name__)

FINGERPRINT_TAG = "mlops.fingerprint"


@contextlib.contextmanager
def mlflow_session(settings: Settings, schema: Schema) -> Iterator[MlflowClient]:
    """Point MLflow at the configured store and make sure the experiment and
    registered model exist. Connection failures become :class:`TrackingUnavailable`.
    With the lakehouse on, the store's endpoint and keys are in the environment
    for the session only (MLflow's S3 artifacts and Feast's S3 reads take them there)."""
    uri = settings.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with s3_environment(settings):
            client = open_client(uri)
            experiment = client.get_experiment_by_name(settings.experiment_name)
            if experiment is None:
                client.create_experiment(settings.experiment_name,
                                         artifact_location=settings.artifact_location)
            mlflow.set_experiment(settings.experiment_name)
            try:
                client.create_registered_model(
                    settings.model_name,
                    description=f"Linear regression predicting {schema.target} of a {schema.entity} from its "
                                f"Feast features ({', '.join(schema.feature_names)}); trained by "
                                "mlops-shared-volume.")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            yield client
    except RestException:
        raise
    except (MlflowException, OSError) as exc:
        if _is_connection_failure(exc):
            raise TrackingUnavailable(uri, exc) from exc
        raise


def open_client(uri: str) -> MlflowClient:
    """A client on this tracking and registry URI (a local SQLite store is
    created atomically first)."""
    if uri.startswith("sqlite:///"):
        init_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def init_sqlite_store(db: Path) -> None:
    """Create MLflow's SQLite store atomically.

    MLflow creates its tables through a series of migrations; a process killed
    half-way leaves a database that every later start refuses ("index already
    exists"). So the store is built in a temp file beside it and renamed into
    place once complete.
    """
    if db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from pipeline.io import atomic_path

    db.parent.mkdir(parents=True, exist_ok=True)
    log.info("mlflow: creating the tracking store %s", db)
    with atomic_path(db) as tmp:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", str(db.parent / "artifacts"))
        store.engine.dispose()


def _is_connection_failure(exc: BaseException) -> bool:
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, ConnectionError)):
            return True
        if "Max retries exceeded" in str(seen) or "Connection refused" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def find_version_by_fingerprint(client: MlflowClient, name: str, fingerprint: str) -> ModelVersion | None:
    versions = client.search_model_versions(
        f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def version_score(version: ModelVersion) -> tuple[float | None, str, str | None]:
    """``(RMSE, what it was measured on, data set)`` the version was registered with."""
    tags = version.tags
    if "mlops.score_rmse" in tags:
        return float(tags["mlops.score_rmse"]), tags.get("mlops.scored_on", "holdout"), tags.get("mlops.dataset")
    if "mlops.holdout_rmse" in tags:  # versions registered before scores named what they measured
        return float(tags["mlops.holdout_rmse"]), "holdout", tags.get("mlops.dataset")
    return None, "unknown", tags.get("mlops.dataset")


def _signature(schema: Schema):
    example = pd.DataFrame({name: [0.0] for name in schema.feature_names})
    return infer_signature(example, np.zeros(1))


def register_model_version(client: MlflowClient, settings: Settings, schema: Schema, *, params: dict[str, Any],
                           score: tuple[float, str],
                           metrics: dict[str, float], lineage: dict[str, str], fingerprint: str,
                           weights_path: Path, model_code: Path, figure, coefficients: dict) -> ModelVersion:
    """Log one training run and register its model as a new version.

    The version is created with its fingerprint and metrics as tags in one
    registry call, so a killed run leaves either no version or a whole one.
    """
    with mlflow.start_run(run_name=f"train-{fingerprint[:8]}") as run:
        mlflow.set_tags({**lineage, FINGERPRINT_TAG: fingerprint})
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_figure(figure, "plots/fit.png")
        mlflow.log_dict(coefficients, "coefficients.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(model_code),
            artifacts={"weights": str(weights_path)},
            signature=_signature(schema),
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
                              f"pandas=={pd.__version__}"],
        )
        # The registered model exists (mlflow_session made it), so the version is
        # created straight away: mlflow.register_model would try to create the
        # model again and print "already exists" on every brand-new store.
        version = client.create_model_version(
            settings.model_name, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id,
            tags={FINGERPRINT_TAG: fingerprint,
                  "mlops.score_rmse": repr(score[0]), "mlops.scored_on": score[1],
                  "mlops.metrics": json.dumps({k: v for k, v in metrics.items()
                                                if k.startswith(("holdout_", "train_"))}),
                  **lineage},
        )
        # What register_model also does: the logged model links to its version in the UI.
        client.set_logged_model_tags(info.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [{"name": version.name, "version": version.version}])})
        log.info("train: logged run %s, registered %s version %s", run.info.run_id, version.name,
                 version.version)
    return version


def set_alias(client: MlflowClient, name: str, alias: str, version: int) -> None:
    client.set_registered_model_alias(name, alias, str(version))


# ------------------------------------------------------- serving the aliased model
# What `serve` needs from the registry: load a version and check it, and follow the alias.
#
# Serving trusts no model file. It loads only this project's own format: an MLflow
# "model from code" whose code is pipeline/mlflow_model.py and whose one artifact is
# the weights JSON. It reads the version's MLmodel (YAML, parsed as data), checks
# that it is that format, downloads the weights file alone, and builds the
# LinearModel from the *installed* package: the code stored with the version is
# never run, and nothing is unpickled (no mlflow.pyfunc.load_model, which would
# unpickle a cloudpickled python_model or import a stored loader). Anything else
# is refused, counted as mlops_model_loads_total{outcome="refused"} and logged.
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
    the model from the installed package's code (see the comment above); ``settings``
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


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a local SQLite tracking store, else None."""
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


def dispose(client: MlflowClient) -> None:
    """Close the pooled SQLite connections of a client's stores (they hold the old file open)."""
    for store in (getattr(client, "_tracking_client", None) and client._tracking_client.store,
                  client._get_registry_client().store):
        engine = getattr(store, "engine", None)
        if engine is not None:
            engine.dispose()
