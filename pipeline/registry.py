"""MLflow tracking and model registry: the one place that talks to MLflow.

Local runs use a SQLite backend store and artifacts on the shared volume; the
compose twin and the chart point ``MLFLOW_TRACKING_URI`` at a tracking server
that proxies artifacts.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
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
from pipeline.schema import Schema
from pipeline.settings import Settings

log = logging.getLogger(__name__)

FINGERPRINT_TAG = "mlops.fingerprint"


@contextlib.contextmanager
def mlflow_session(settings: Settings, schema: Schema) -> Iterator[MlflowClient]:
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
class LoadedModel:
    """A registered version, loaded and checked; ``predict`` takes rows in schema order."""

    __slots__ = ("name", "version", "alias", "python_model")

    def __init__(self, name: str, version: int, alias: str, python_model: Any) -> None:
        self.name, self.version, self.alias = name, version, alias
        self.python_model = python_model  # pipeline/mlflow_model.py's LinearModel, as MLflow loaded it

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.python_model.predict_array(features)


def check_model(name: str, version: int, alias: str, inner: Any) -> LoadedModel:
    """Refuse a model that answers a zero row with something other than one finite number."""
    names = list(getattr(inner, "feature_names", []))
    probe = inner.predict_array(np.zeros((1, len(names))))
    if probe.shape != (1,) or not np.isfinite(probe).all():
        raise ValueError(f"version {version} gives {probe!r} for a zero row")
    return LoadedModel(name, version, alias, inner)


def load_model_version(name: str, version: int, alias: str, tracking_uri: str) -> LoadedModel:
    """Download a registered version's artifacts, load it through MLflow and check it."""
    import tempfile

    # Resolve the artifacts through this registry explicitly, not MLflow's globals.
    client = open_client(tracking_uri)
    source = client.get_model_version_download_uri(name, str(version))
    with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp,
                                                    tracking_uri=tracking_uri)
        loaded = mlflow.pyfunc.load_model(local)
    return check_model(name, version, alias, loaded.unwrap_python_model())


class ModelWatcher:
    """Follows the registry alias; swaps models only once the new one loaded.

    ``resolve()`` gives the version the alias points at (None: no alias yet),
    ``loader`` loads one, ``on_load(outcome, version)`` hears of every attempt
    ("ok" or "failed"). ``wait(stop, seconds)`` is the poll's pause: it returns
    True once ``stop`` is set; tests give one driven by their own clock.
    """

    def __init__(self, settings: Settings, *, resolve: Callable[[], int | None] | None = None,
                 loader: Callable[[str, int, str, str], LoadedModel] = load_model_version,
                 on_load: Callable[[str, int], None] | None = None,
                 wait: Callable[[Any, float], bool] | None = None,
                 feature_names: Sequence[str] | None = None) -> None:
        import threading

        self.settings = settings
        self.feature_names = feature_names  # what the online store serves, in model order
        self.resolve = resolve or self._alias_target
        self.loader = loader
        self._on_load = on_load or (lambda outcome, version: None)
        self._wait = wait or (lambda stop, seconds: stop.wait(seconds))
        self.current: LoadedModel | None = None
        self.failed_version: int | None = None
        self.last_error: str | None = None
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: MlflowClient | None = None  # made once it can be, reused by every poll

    def _alias_target(self) -> int | None:
        if self._client is None:
            self._client = open_client(self.settings.tracking_uri)
        mv = alias_version(self._client, self.settings.model_name, self.settings.model_alias)
        return int(mv.version) if mv else None

    def refresh(self) -> bool:
        """Check the alias once; returns True when a new model was swapped in."""
        with self._refresh_lock:
            target = self.resolve()
            if target is None or (self.current and self.current.version == target) \
                    or target == self.failed_version:
                return False
            s = self.settings
            try:
                model = self.loader(s.model_name, target, s.model_alias, s.tracking_uri)
                names = list(getattr(model.python_model, "feature_names", []))
                if self.feature_names is not None and names != list(self.feature_names):
                    raise ValueError(f"version {target} expects features {names}, the store serves "
                                     f"{list(self.feature_names)}")
            except Exception as exc:  # keep serving the previous model, say why
                self.failed_version, self.last_error = target, f"{type(exc).__name__}: {exc}"
                self._on_load("failed", target)
                log.error("serve: version %s of %s failed to load, still serving %s: %s", target,
                          s.model_name, self.current.version if self.current else "nothing",
                          self.last_error)
                return False
            previous = self.current
            self.current = model  # one reference assignment: requests see old or new, whole
            self.failed_version, self.last_error = None, None
            self._on_load("ok", target)
            log.info("serve: now serving %s version %d (was %s)", model.name, target,
                     previous.version if previous else "nothing")
            return True

    def _loop(self) -> None:
        while not self._wait(self._stop, self.settings.model_poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # registry unreachable: keep the current model
                log.warning("serve: could not check the model alias: %s", exc)

    def start(self) -> None:
        import threading

        try:
            self.refresh()
        except Exception as exc:
            log.warning("serve: could not check the model alias at start: %s", exc)
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
