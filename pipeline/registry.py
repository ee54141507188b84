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

from pipeline import schema
from pipeline.errors import TrackingUnavailable
from pipeline.settings import Settings

log = logging.getLogger(__name__)

FINGERPRINT_TAG = "mlops.fingerprint"


@contextlib.contextmanager
def mlflow_session(settings: Settings) -> Iterator[MlflowClient]:
    """Point MLflow at the configured store and make sure the experiment and
    registered model exist. Connection failures become :class:`TrackingUnavailable`."""
    uri = settings.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        client = open_client(uri)
        experiment = client.get_experiment_by_name(settings.experiment_name)
        if experiment is None:
            client.create_experiment(settings.experiment_name,
                                     artifact_location=settings.artifact_location)
        mlflow.set_experiment(settings.experiment_name)
        try:
            client.create_registered_model(
                settings.model_name,
                description="Linear regression trained by mlops-shared-volume on Feast features.")
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


def version_rmse(client: MlflowClient, version: ModelVersion) -> float:
    """The holdout RMSE the version was registered with."""
    if "mlops.holdout_rmse" in version.tags:
        return float(version.tags["mlops.holdout_rmse"])
    return float(client.get_run(version.run_id).data.metrics["holdout_rmse"])


def _signature():
    example = pd.DataFrame({name: [0.0] for name in schema.FEATURE_NAMES})
    return infer_signature(example, np.zeros(1))


def register_model_version(client: MlflowClient, settings: Settings, *, params: dict[str, Any],
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
            signature=_signature(),
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
                              f"pandas=={pd.__version__}"],
        )
        log.info("train: logged run %s, registering %s", run.info.run_id, settings.model_name)
        version = mlflow.register_model(
            info.model_uri, settings.model_name,
            tags={FINGERPRINT_TAG: fingerprint,
                  "mlops.holdout_rmse": repr(metrics["holdout_rmse"]),
                  "mlops.metrics": json.dumps({k: v for k, v in metrics.items()
                                                if k.startswith(("holdout_", "train_"))}),
                  **lineage},
        )
    return version


def set_alias(client: MlflowClient, name: str, alias: str, version: int) -> None:
    client.set_registered_model_alias(name, alias, str(version))
