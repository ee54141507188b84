"""MLflow tracking and model registry: sessions, clients, logged runs, versions and aliases.

Local runs use a SQLite backend store and artifacts on the shared volume; the
compose twin and the chart point ``MLFLOW_TRACKING_URI`` at a tracking server
that proxies artifacts. Loading a version for serving: :mod:`pipeline.model_loading`.
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
    """Create MLflow's SQLite store atomically, never over one that is there.

    MLflow creates its tables through a series of migrations; a process killed
    half-way leaves a database that every later start refuses ("index already
    exists"). So the store is built in a temp file beside it and published
    once complete, as a hard link: if another process published one meanwhile
    (the run's store made ahead, a serving worker), that one stays and this
    copy is dropped, so no open store is ever replaced under its users.
    """
    if db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from pipeline.io import atomic_path

    log.info("mlflow: creating the tracking store %s", db)
    with atomic_path(db, replace=False) as tmp:  # another process's store came first: it stays
        store = SqlAlchemyStore(f"sqlite:///{tmp}", str(db.parent / "artifacts"))
        store.engine.dispose()


# A store is built in seconds: a temp store older than this was left by a killed maker.
STALE_STORE_SECONDS = 600


def remove_stale_store_temps(db: Path, older_than: float = STALE_STORE_SECONDS) -> int:
    """Remove the temp stores (and their SQLite journals) that a maker killed before it
    published left beside ``db``; returns how many. Only old ones: a younger temp may
    be another process's store being built right now (a serving worker's, say)."""
    import time

    from pipeline.io import TMP_PREFIX

    removed = 0
    cutoff = time.time() - older_than
    for tmp in db.parent.glob(f"{TMP_PREFIX}{db.name}.*"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
    return removed


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
