"""Every error a user can cause or meet, each with a message saying what to do.

The CLI prints ``str(error)`` on one line and exits with ``exit_code``; the web
layer turns a :class:`PipelineError` into JSON with ``http_status``.

Exit codes: 1 other, 2 configuration, 3 upstream missing, 4 bad data, 5 lock
busy, 6 tracking or online store, 7 no model, 8 shared folder is not a folder,
9 shared folder not writable, 10 disk full, 11 object store.
"""

from __future__ import annotations

import errno
from pathlib import Path


class PipelineError(Exception):
    """Base class: a message that tells the user what to do next."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(PipelineError):
    exit_code = 2


class UpstreamMissing(PipelineError):
    """A stage's input has not been produced yet."""

    exit_code = 3

    def __init__(self, stage: str, upstream: str, shared: Path, waited: float) -> None:
        hint = f" after waiting {waited:.0f}s" if waited else ""
        super().__init__(
            f"{stage}: no successful '{upstream}' run found under {shared / 'runs'}{hint}; "
            f"run `python -m pipeline {upstream}` first (or `python -m pipeline run` for every stage)"
        )


class PublishedFeaturesChanged(PipelineError):
    """With the lakehouse on: the published features are not those the features stage recorded."""

    exit_code = 4

    def __init__(self, published: str | None, recorded: str) -> None:
        super().__init__(
            f"the lakehouse's published features (md5 {published or 'none'}) are not the ones the features "
            f"stage recorded (md5 {recorded}): another run or a restore published other data under this "
            "bucket and prefix; run `python -m pipeline features` again (or give this volume its own "
            "MLOPS_S3_PREFIX)")


class RawDataChanged(PipelineError):
    """Raw data on the volume no longer matches what DVC recorded."""

    exit_code = 4

    def __init__(self, files: list[str], dvc_file: Path) -> None:
        names = ", ".join(files)
        super().__init__(
            f"raw data does not match its DVC record {dvc_file.name}: {names} changed after "
            f"versioning. Restore it with `cd {dvc_file.parent.parent} && dvc checkout --force "
            f"{dvc_file.parent.name}/{dvc_file.name}` (discards the change; dvc is in the project's environment), "
            "or re-run `python -m pipeline ingest` to generate and version it again"
        )


class SchemaError(PipelineError):
    exit_code = 4


class OnlineStoreIncomplete(PipelineError):
    """The feast stage wrote the online store, but an entity it must hold is missing."""

    exit_code = 6

    def __init__(self, how: str, entity: int) -> None:
        super().__init__(
            f"feast: {how}, but entity {entity} is not in the online store; another writer may have "
            "emptied it meanwhile (a Redis restart or FLUSHDB): re-run `python -m pipeline feast`"
        )


class LockBusy(PipelineError):
    exit_code = 5

    def __init__(self, path: Path, holder: str, waited: float) -> None:
        super().__init__(
            f"another pipeline run ({holder}) holds {path} and did not finish within {waited:.0f}s; "
            "wait for it to end, or raise MLOPS_LOCK_TIMEOUT_SECONDS"
        )


class TrackingUnavailable(PipelineError):
    exit_code = 6

    def __init__(self, uri: str, cause: BaseException) -> None:
        super().__init__(
            f"MLflow tracking at {uri} is unreachable or failed ({type(cause).__name__}: {cause}); "
            "nothing was registered and no alias moved. Start the tracking server or fix "
            "MLFLOW_TRACKING_URI, then re-run"
        )


class NoModel(PipelineError):
    exit_code = 7
    http_status = 503

    def __init__(self, name: str, alias: str) -> None:
        super().__init__(
            f"no model version of '{name}' carries the alias '{alias}' yet; "
            "run `python -m pipeline run` (train + promote) first"
        )


class OnlineStoreUnavailable(PipelineError):
    http_status = 503

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"online store unreachable ({type(cause).__name__}: {cause}); retry shortly"
        )


class BadRequest(PipelineError):
    http_status = 400


class UnprocessableEntity(PipelineError):
    http_status = 422


class UnknownEntity(PipelineError):
    http_status = 404

    def __init__(self, key: str, values: list[int]) -> None:
        shown = ", ".join(str(v) for v in values[:10])
        more = f" and {len(values) - 10} more" if len(values) > 10 else ""
        super().__init__(
            f"no features in the online store for {key} {shown}{more}; "
            "ask for an entity that was ingested (GET /predict answers for a sample one)"
        )


class LayoutChanged(PipelineError):
    """Feast's helpers no longer produce the Redis layout pipeline/redis_layout.py writes."""


class ObjectStoreError(PipelineError):
    """The object store is not configured, unreachable, or refused a request."""

    exit_code = 11


class EngineUnavailable(PipelineError):
    """The Dask scheduler named by MLOPS_DASK_SCHEDULER does not answer."""

    exit_code = 12


class SharedNotAFolder(PipelineError):
    exit_code = 8


class SharedNotWritable(PipelineError):
    exit_code = 9


class DiskFull(PipelineError):
    exit_code = 10


def _chain(exc: BaseException):
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def storage_error(exc: BaseException, shared: Path) -> PipelineError | None:
    """The one-line error for a storage failure anywhere in ``exc``'s chain (an
    ``OSError`` from our code, pyarrow, DVC or SQLite through MLflow and Feast),
    or None when it is not one. Writes are atomic, so nothing is torn: the
    messages say so, and that re-running finishes the job."""
    for cause in _chain(exc):
        code = getattr(cause, "errno", None)
        text = str(cause)
        where = getattr(cause, "filename", None) or shared
        if code == errno.ENOSPC or "No space left on device" in text or "database or disk is full" in text:
            return DiskFull(f"no space left on the device holding {shared}; free space or grow the volume, "
                            "then re-run the same command (finished files are intact, the unfinished one "
                            "was discarded)")
        if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in text \
                or "attempt to write a readonly database" in text:
            return SharedNotWritable(f"cannot write {where} ({getattr(cause, 'strerror', None) or text}); "
                                     f"make {shared} writable for this user (uid of the pods: 10001), "
                                     "or point MLOPS_SHARED_DIR at a folder that is")
    if shared.exists() and not shared.is_dir():  # ENOTDIR or EEXIST, from whichever writer met it first
        return SharedNotAFolder(f"the shared folder {shared} is a file, not a folder; point "
                                "MLOPS_SHARED_DIR at a folder (it is created if missing)")
    return None
