"""One typed settings object, read from ``MLOPS_*`` environment variables.

Built once at the entry point (``pipeline.cli.main``) and passed down; nothing
below the CLI reads ``os.environ``. The same variable names are used by the
local simulator, compose.yaml and the Helm chart's ConfigMap; tests fail when
either sets an ``MLOPS_*`` name this class does not know.

Every field carries its description: ``docs/configuration.md`` is generated
from them (:mod:`pipeline.settings_doc`) and a test fails when the two differ.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError



class Settings(BaseSettings):
    """Everything a stage needs to know about its environment."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_", extra="ignore", frozen=True)

    shared_dir: Path = Field(Path(".shared"), description="root of the shared volume (the PVC)")
    dataset: Path | None = Field(None, description="data set declaration (YAML, docs/datasets.md); unset: the "
                                                   "built-in synthetic customers")
    redis_url: str | None = Field(None, description="Redis online store, `redis://[:password@]host:port/db` "
                                                    "(`rediss://` for TLS); unset: Feast's SQLite online store "
                                                    "on the volume")
    redis_password: str | None = Field(None, description="Redis password (from a secret); overrides the URL's")
    redis_password_file: Path | None = Field(None, description="file holding the Redis password (a compose or "
                                                               "Kubernetes secret)")
    redis_ca_file: Path | None = Field(None, description="CA certificate that signed a `rediss://` (TLS) "
                                                         "server's; unset: the system's CAs")
    redis_cluster: bool = Field(False, description="the Redis URL names one node (database 0) of a Redis "
                                                   "Cluster: Feast (`redis_type: redis_cluster`), the feast "
                                                   "stage's loader and `/predict` send each key to its slot's "
                                                   "master (docs/architecture.md, Redis Cluster)")
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI"),
        description="MLflow tracking server or store; unset: `sqlite:///<shared>/mlflow/mlflow.db`")
    experiment_name: str = Field("mlops-shared-volume", description="MLflow experiment of the training runs")
    model_name: str | None = Field(None, description="registered model name; unset: the data set's (the "
                                                     "customers': `mlops-linear`)")
    model_alias: str = Field("production", description="registry alias that promote moves and serve follows")
    rows: int = Field(10_000, ge=10, description="rows ingest generates for a synthetic data set")
    seed: int = Field(42, ge=0, description="seed of the generator and of the train/holdout split")
    synthetic_batch: int = Field(0, ge=0, description="synthetic data set: which batch ingest generates; batch n's "
                                                      "event times follow batch n-1's (newer data for the monitor "
                                                      "and retrain)")
    synthetic_drift: str | None = Field(None, description="synthetic data set: shift features, `feature=shift[,...]` "
                                                          "in standard deviations of the feature's generated "
                                                          "distribution, clipped to its declared bounds (a drifted "
                                                          "batch for the monitor); unset: no shift")
    train_chunk_rows: int = Field(250_000, ge=1000, description="train: label rows per chunk of the streamed "
                                                                "point-in-time retrieval (each chunk one Feast "
                                                                "historical retrieval) and least squares; train's "
                                                                "memory grows with this, not with the data")
    dask_scheduler: str | None = Field(None, description="Dask scheduler (`tcp://host:8786`, or `local` for a "
                                                         "LocalCluster of worker processes): the features stage "
                                                         "validates one raw part per task there, train retrieves "
                                                         "and reduces one bucket per task; unset: one process "
                                                         "(docs/scale.md)")
    promote_tolerance: float = Field(0.05, ge=0, description="relative holdout-RMSE slack a new version may "
                                                             "have over the current one and still be promoted")
    wait_seconds: float = Field(0.0, ge=0, description="how long a stage waits for its upstream's run record")
    lock_timeout_seconds: float = Field(600.0, ge=0, description="how long a stage waits for another run to "
                                                                 "release the shared folder's lock")
    online_timeout_seconds: float = Field(0.05, gt=0, description="Redis socket timeout of a lookup, no retries")
    online_backoff_seconds: float = Field(0.25, ge=0, description="after Redis was found unreachable, answer "
                                                                  "503 at once for this long")
    online_failures_before_backoff: int = Field(2, ge=1, description="late Redis answers in a row before serving "
                                                                     "declares the store down and backs off (a "
                                                                     "refused connection backs off at once)")
    model_poll_seconds: float = Field(5.0, gt=0, description="how often serving checks the registry alias")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="largest POST /predict body accepted")
    prediction_log: bool = Field(True, description="log what /predict served to <shared>/monitoring/predictions "
                                                   "(Parquet, off the request path) for the monitor")
    monitor_psi_threshold: float = Field(0.2, gt=0, description="monitor: PSI above which a feature counts as "
                                                                "drifted")
    monitor_ks_threshold: float = Field(0.1, gt=0, le=1, description="monitor: KS statistic above which a feature "
                                                                     "counts as drifted")
    monitor_window_seconds: float = Field(86400.0, gt=0, description="monitor: how far back the prediction log is "
                                                                     "read")
    monitor_min_rows: int = Field(100, ge=1, description="monitor: fewer values than this are not judged for drift")
    max_batch: int = Field(1000, ge=1, description="most entities in one batch request")
    body_timeout_seconds: float = Field(5.0, gt=0, description="serving: a request's headers and body must "
                                                               "arrive within this long; a slower body is cut "
                                                               "with a 408, slower headers close the connection")
    host: str = Field("127.0.0.1", description="serving: bind address")
    port: int = Field(8000, ge=0, le=65535, description="serving: port")
    workers: int = Field(2, ge=1, description="serving: worker processes")
    threads: int = Field(1, ge=1, description="serving: threads per worker process")
    git_commit: str | None = Field(None, description="lineage tag on the MLflow run; unset: `git rev-parse "
                                                     "HEAD` where there is a checkout")
    run_id: str | None = Field(None, description="rollout id (the chart sets it): stages wait for upstream "
                                                 "records of the same id")
    s3_endpoint: str | None = Field(None, description="S3-compatible object store for backups "
                                                      "(`http://127.0.0.1:8333`, `https://s3.eu-west-1.amazonaws.com`); "
                                                      "unset: no object store (docs/objectstore.md)")
    s3_bucket: str = Field("mlops", description="object store bucket (must exist; the local SeaweedFS "
                                                "creates it)")
    s3_prefix: str | None = Field(None, description="key prefix inside the bucket for this volume's backups "
                                           "(`team-a/prod/`); one volume per prefix")
    s3_region: str = Field("us-east-1", description="object store region (SeaweedFS, MinIO and Ceph accept any)")
    s3_access_key_file: Path | None = Field(None, description="file holding the S3 access key (a secret); "
                                                              "unset: `AWS_ACCESS_KEY_ID` or botocore's chain")
    s3_secret_key_file: Path | None = Field(None, description="file holding the S3 secret key (a secret); "
                                                              "unset: `AWS_SECRET_ACCESS_KEY` or botocore's "
                                                              "chain")
    lakehouse: bool = Field(False, description="with MLOPS_S3_ENDPOINT: raw data (DVC's remote), features and "
                                               "labels (Parquet by event month) and a local MLflow store's "
                                               "artifacts live in the object store under "
                                               "`s3://<bucket>/<prefix>lakehouse/`; Feast's offline store reads "
                                               "them there (docs/objectstore.md#lakehouse)")
    backup_keep: int = Field(7, ge=1, description="backup: complete snapshots kept; older ones and the "
                                                  "files only they referenced are deleted")

    @model_validator(mode="before")
    @classmethod
    def _model_name_of_the_dataset(cls, data):
        """Unset, the model is named by the data set's declaration."""
        if isinstance(data, dict) and not data.get("model_name"):
            from pipeline.dataset import load

            path = data.get("dataset") or None
            data = {**data, "model_name": load(Path(path) if path else None).model_name}
        return data

    @field_validator("dataset", "redis_url", "redis_password", "redis_password_file", "redis_ca_file",
                     "mlflow_tracking_uri",
                     "git_commit", "run_id", "s3_endpoint", "synthetic_drift", "dask_scheduler", "s3_prefix", "s3_access_key_file",
                     "s3_secret_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _lakehouse_needs_a_store(self):
        if self.lakehouse and not self.s3_endpoint:
            raise ValueError("MLOPS_LAKEHOUSE is on but MLOPS_S3_ENDPOINT is unset: set the object store "
                             "(docs/objectstore.md) or unset MLOPS_LAKEHOUSE")
        return self

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            try:
                port_ok = parts.port is None or parts.port > 0
            except ValueError:
                port_ok = False
            db = parts.path.strip("/")
            if parts.scheme not in ("redis", "rediss") or not parts.hostname or not port_ok or not (db == "" or db.isdigit()):
                # the URL may hold a password: show only its shape
                raise ValueError(
                    f"MLOPS_REDIS_URL ({mask_url(value)}) is not a redis:// or rediss:// (TLS) host:port/db URL "
                    "with a numeric "
                    "port and database; fix it, or unset it to use Feast's SQLite online store"
                )
        return value

    @field_validator("synthetic_drift")
    @classmethod
    def _check_synthetic_drift(cls, value: str | None) -> str | None:
        """``feature=shift[,...]``, shifts finite numbers, each feature once; returned as
        ``feature=shift,...`` (sorted) so one drift is written one way. Whether the
        features exist is ingest's check (it knows the generator's)."""
        if value is None:
            return None
        shifts: dict[str, float] = {}
        for item in value.split(","):
            match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*", item)
            try:
                shift = float(match.group(2)) if match else math.nan
            except ValueError:
                shift = math.nan
            if not math.isfinite(shift) or match.group(1) in shifts:
                raise ValueError(f"MLOPS_SYNTHETIC_DRIFT {value!r} is not `feature=shift[,...]` with each feature "
                                 "once and shifts in standard deviations (`monthly_spend=1.5,age=-0.5`); "
                                 "fix it or unset it")
            shifts[match.group(1)] = shift
        return ",".join(f"{name}={shift!r}" for name, shift in sorted(shifts.items())) or None

    # ----------------------------------------------------------------- layout
    @property
    def shared(self) -> Path:
        return self.shared_dir.resolve()

    @property
    def raw_dir(self) -> Path:
        return self.shared / "data" / "raw"

    @property
    def features_dir(self) -> Path:
        return self.shared / "data" / "features"

    @property
    def features_path(self) -> Path:
        return self.features_dir / "features.parquet"

    @property
    def labels_path(self) -> Path:
        return self.features_dir / "labels.parquet"

    @property
    def quarantine_dir(self) -> Path:
        return self.shared / "data" / "quarantine"

    @property
    def feast_dir(self) -> Path:
        return self.shared / "feast"

    @property
    def mlflow_dir(self) -> Path:
        return self.shared / "mlflow"

    @property
    def runs_dir(self) -> Path:
        return self.shared / "runs"

    @property
    def dvc_remote_dir(self) -> Path:
        return self.shared / "dvc-store"

    def layout(self) -> list[Path]:
        """The folders of the shared volume contract (docs/architecture.md)."""
        return [self.raw_dir, self.features_dir, self.quarantine_dir, self.feast_dir,
                self.mlflow_dir, self.runs_dir, self.dvc_remote_dir]

    @property
    def lakehouse_uri(self) -> str | None:
        """``s3://<bucket>/<prefix>lakehouse`` with the lakehouse on, else None:
        DVC's remote, features, labels and MLflow artifacts live under it."""
        if not self.lakehouse:
            return None
        prefix = (self.s3_prefix or "").strip("/")
        return "s3://" + "/".join(p for p in (self.s3_bucket, prefix, "lakehouse") if p)

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: on the volume for a local
        store (in the object store with the lakehouse on); the tracking
        server's own choice (proxied) for a server."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return None
        if self.lakehouse_uri:
            return f"{self.lakehouse_uri}/mlflow"
        return (self.mlflow_dir / "artifacts").as_uri()

    # ----------------------------------------------------------------- redis
    @property
    def redis_tls(self) -> bool:
        return bool(self.redis_url) and self.redis_url.startswith("rediss://")

    def redis_tls_options(self) -> dict[str, object]:
        """redis-py's keyword arguments for TLS (``rediss://``): none for plain Redis."""
        if not self.redis_tls:
            return {}
        return {"ssl": True, **({"ssl_ca_certs": str(self.redis_ca_file)} if self.redis_ca_file else {})}

    def redis_parts(self) -> tuple[str, int, int, str | None]:
        """``(host, port, db, password)`` of the Redis online store."""
        if not self.redis_url:
            raise ConfigError("no Redis online store configured (MLOPS_REDIS_URL is unset)")
        parts = urlsplit(self.redis_url)
        db = int(parts.path.strip("/") or 0)
        password = self.redis_password
        if password is None and self.redis_password_file is not None:
            try:
                password = self.redis_password_file.read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"cannot read MLOPS_REDIS_PASSWORD_FILE {self.redis_password_file}: "
                                 f"{exc.strerror}; mount the secret there or unset the variable") from None
        if password is None and parts.password:
            password = unquote(parts.password)
        return parts.hostname or "localhost", parts.port or 6379, db, password


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host_port = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host_port}").geturl()


def env_name(field: str) -> str:
    """The environment variable a settings field is read from."""
    info = Settings.model_fields[field]
    if isinstance(info.validation_alias, AliasChoices):
        return str(info.validation_alias.choices[0])
    return f"{Settings.model_config['env_prefix']}{field.upper()}"


def known_variables() -> set[str]:
    return {env_name(name) for name in Settings.model_fields}
