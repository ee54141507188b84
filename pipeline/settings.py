"""One typed settings object, read from ``MLOPS_*`` environment variables.

Built once at the entry point (``pipeline.cli.main``) and passed down; nothing
below the CLI reads ``os.environ``. The same variable names are used by the
local simulator, compose.yaml and the Helm chart's ConfigMap.

| variable | default | meaning |
|---|---|---|
| ``MLOPS_SHARED_DIR`` | ``./.shared`` | root of the shared volume (the PVC) |
| ``MLOPS_REDIS_URL`` | unset | ``redis://[:password@]host:port/db``; unset: Feast's SQLite online store |
| ``MLOPS_REDIS_PASSWORD`` | unset | Redis password (from a secret); overrides the URL's |
| ``MLOPS_REDIS_PASSWORD_FILE`` | unset | file holding the Redis password (a compose or Kubernetes secret) |
| ``MLFLOW_TRACKING_URI`` | ``sqlite:///<shared>/mlflow/mlflow.db`` | MLflow tracking server or store |
| ``MLOPS_MODEL_NAME`` | ``mlops-linear`` | registered model name |
| ``MLOPS_MODEL_ALIAS`` | ``production`` | registry alias that serving follows |
| ``MLOPS_ROWS`` / ``MLOPS_SEED`` | ``10000`` / ``42`` | synthetic data size and seed |
| ``MLOPS_PROMOTE_TOLERANCE`` | ``0.05`` | relative holdout-RMSE slack allowed when promoting |
| ``MLOPS_WAIT_SECONDS`` | ``0`` | how long a stage waits for its upstream's run record |
| ``MLOPS_RUN_ID`` | unset | rollout id: stages wait for upstream records of the same id |
| ``MLOPS_ONLINE_TIMEOUT_SECONDS`` | ``0.05`` | Redis socket timeout, no retries |
| ``MLOPS_ONLINE_BACKOFF_SECONDS`` | ``0.25`` | after Redis failed, answer 503 at once for this long |
| ``MLOPS_MODEL_POLL_SECONDS`` | ``5`` | how often serving checks the alias |
| ``MLOPS_HOST`` / ``MLOPS_PORT`` / ``MLOPS_WORKERS`` / ``MLOPS_THREADS`` | ``127.0.0.1`` / ``8000`` / ``2`` / ``1`` | serving: bind address, worker processes, threads each |
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

FEAST_PROJECT = "mlops"


class Settings(BaseSettings):
    """Everything a stage needs to know about its environment."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_", extra="ignore", frozen=True)

    shared_dir: Path = Path(".shared")
    redis_url: str | None = None
    redis_password: str | None = None
    redis_password_file: Path | None = None
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI")
    )
    experiment_name: str = "mlops-shared-volume"
    model_name: str = "mlops-linear"
    model_alias: str = "production"
    rows: int = Field(default=10_000, ge=10)
    seed: int = Field(default=42, ge=0)
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    promote_tolerance: float = Field(default=0.05, ge=0)
    wait_seconds: float = Field(default=0.0, ge=0)
    lock_timeout_seconds: float = Field(default=600.0, ge=0)
    online_timeout_seconds: float = Field(default=0.05, gt=0)
    online_backoff_seconds: float = Field(default=0.25, ge=0)
    model_poll_seconds: float = Field(default=5.0, gt=0)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    max_batch: int = Field(default=1000, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=2, ge=1)
    threads: int = Field(default=1, ge=1)
    git_commit: str | None = None
    run_id: str | None = None

    @field_validator("redis_url", "redis_password", "redis_password_file", "mlflow_tracking_uri",
                     "git_commit", "run_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme != "redis" or not parts.hostname:
                raise ValueError(
                    f"MLOPS_REDIS_URL={value!r} is not a redis://host:port/db URL; "
                    "unset it to use Feast's SQLite online store"
                )
        return value

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
        """The folders of the shared volume contract (DESIGN.md)."""
        return [self.raw_dir, self.features_dir, self.quarantine_dir, self.feast_dir,
                self.mlflow_dir, self.runs_dir, self.dvc_remote_dir]

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: on the volume for a local
        store; the tracking server's own choice (proxied) for a server."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return None
        return (self.mlflow_dir / "artifacts").as_uri()

    # ----------------------------------------------------------------- redis
    def redis_parts(self) -> tuple[str, int, int, str | None]:
        """``(host, port, db, password)`` of the Redis online store."""
        if not self.redis_url:
            raise ValueError("no Redis online store configured (MLOPS_REDIS_URL is unset)")
        parts = urlsplit(self.redis_url)
        db = int(parts.path.strip("/") or 0)
        password = self.redis_password
        if password is None and self.redis_password_file is not None:
            try:
                password = self.redis_password_file.read_text().strip() or None
            except OSError as exc:
                raise ValueError(f"cannot read MLOPS_REDIS_PASSWORD_FILE {self.redis_password_file}: "
                                 f"{exc.strerror}; mount the secret there or unset the variable") from None
        if password is None and parts.password:
            password = unquote(parts.password)
        return parts.hostname or "localhost", parts.port or 6379, db, password
