"""The lakehouse path: raw data and features in the object store, not on the volume.

With ``MLOPS_S3_ENDPOINT`` set and ``MLOPS_LAKEHOUSE=true``, everything below
lives under ``s3://<bucket>/<prefix>lakehouse/``::

    dvc/                                  DVC's remote: the raw data, content-addressed
    features/<version>/event_month=<YYYY-MM>/part-0.parquet   the features, by event month
    labels/<version>/event_month=<YYYY-MM>/part-0.parquet     the labels, by event month
    current.json                          the pointer: which version is published
    mlflow/                               MLflow artifacts of a local tracking store

S3 has no rename, so a dataset cannot be swapped in at once. Each write goes
under a new version prefix, and the small pointer object ``current.json`` is
written last, after every file it names is stored (a PUT of one object is
atomic): a reader that follows the pointer sees a whole version or the one
before, never half a dataset. A killed write leaves a prefix no pointer names;
the next publish deletes it, and every version older than the one before (which
Feast's registry names until the feast stage applies the new one).

The S3 client is pyarrow's ``S3FileSystem`` with the endpoint, region and the
key files of :mod:`pipeline.objectstore`. Libraries that only take credentials
from the environment (Feast's file offline store through s3fs, MLflow's S3
artifact store) get them from :func:`s3_environment`, for the duration of one
block only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import ObjectStoreError
from pipeline.io import TMP_PREFIX
from pipeline.objectstore import credentials, require
from pipeline.settings import Settings

log = logging.getLogger(__name__)

POINTER = "current.json"
# By event month, not day: Feast's file offline store (Dask) makes one partition per
# file and persists and shuffles them about ten times per retrieval, so 90 daily files
# of the 3000-row data set made a retrieval 30 times slower than one file; months keep
# files few until each holds millions of rows.
PARTITION = "event_month"
TABLES = ("features", "labels")
UPLOAD_THREADS = 16
# pyarrow's S3 client: the AWS SDK's default request timeout (3 s) is one a store
# busy growing its first volumes can exceed, and pyarrow then only logs the lost write
CONNECT_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS = 5, 60


# ----------------------------------------------------------------- access
def enabled(settings: Settings) -> bool:
    """Whether raw data and features live in the object store (settings refuse
    the lakehouse without an endpoint)."""
    return bool(settings.lakehouse_uri)


def filesystem(settings: Settings):
    """pyarrow's S3 filesystem on the configured store (path-style, like every client here)."""
    from pyarrow.fs import S3FileSystem

    parts = urlsplit(require(settings))
    access, secret = credentials(settings)
    keys = {"access_key": access, "secret_key": secret} if access and secret else {}
    return S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme or "https",
                        region=settings.s3_region, force_virtual_addressing=False,
                        connect_timeout=CONNECT_TIMEOUT_SECONDS, request_timeout=REQUEST_TIMEOUT_SECONDS, **keys)


def root(settings: Settings) -> str:
    """``bucket/prefix/lakehouse`` as pyarrow's S3 filesystem names it (no scheme)."""
    if not settings.lakehouse_uri:
        raise ObjectStoreError("the lakehouse is off: set MLOPS_LAKEHOUSE=true with MLOPS_S3_ENDPOINT")
    return settings.lakehouse_uri.removeprefix("s3://")


@contextlib.contextmanager
def s3_environment(settings: Settings) -> Iterator[None]:
    """The object store's endpoint and keys in this process's environment, for
    the block only (Feast's s3fs reads and MLflow's S3 artifact store take them
    from there), restored afterwards. No-op without the lakehouse."""
    if not enabled(settings):
        yield
        return
    access, secret = credentials(settings)
    wanted = {"MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint, "AWS_DEFAULT_REGION": settings.s3_region,
              "AWS_REGION": settings.s3_region}
    if access and secret:
        wanted.update(AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret)
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    _forget_clients()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _forget_clients()


def _forget_clients() -> None:
    """Drop the S3 clients that remember keys read from the environment: boto3's default
    session resolves them once per process, MLflow's S3 store caches its clients by
    endpoint (not by key) and s3fs its filesystems by arguments. Without this, a block
    would use the keys of the first one in the process (another identity, or another store's)."""
    import sys

    if (boto3 := sys.modules.get("boto3")) is not None:
        boto3.DEFAULT_SESSION = None
    repo = sys.modules.get("mlflow.store.artifact.s3_artifact_repo")
    if hasattr(getattr(repo, "_cached_get_s3_client", None), "cache_clear"):
        repo._cached_get_s3_client.cache_clear()
    if (s3fs := sys.modules.get("s3fs")) is not None:
        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------- publish
def _version(features_md5: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"v{stamp}-{features_md5[:8]}-{secrets.token_hex(2)}"


def _with_event_month(batch: pa.RecordBatch, timestamp: str) -> pa.RecordBatch:
    month = pc.strftime(batch.column(timestamp), format="%Y-%m")  # the event time is UTC
    return pa.RecordBatch.from_arrays([*batch.columns, month], names=[*batch.schema.names, PARTITION])


def _write_table(fs, source: Path, base: str, timestamp: str) -> list[dict]:
    """``source`` (a local Parquet file) as a dataset partitioned by event month
    under ``base``: partitioned on local disk first, then the files sent
    UPLOAD_THREADS at a time (one at a time, the store's latency per file adds up)."""
    from concurrent.futures import ThreadPoolExecutor

    parquet = pq.ParquetFile(source, pre_buffer=False)  # pre-buffered, it keeps what it read
    schema = parquet.schema_arrow.append(pa.field(PARTITION, pa.string()))
    batches = (_with_event_month(b, timestamp) for b in parquet.iter_batches(batch_size=64 * 1024))
    written: list[dict] = []
    # beside the source (on the volume, not a small /tmp); a temp name, so a killed run's is removed
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}partitions-", dir=source.parent) as tmp:
        ds.write_dataset(
            ds.Scanner.from_batches(batches, schema=schema), tmp, format="parquet",
            partitioning=ds.partitioning(pa.schema([pa.field(PARTITION, pa.string())]), flavor="hive"),
            basename_template="part-{i}.parquet",
            file_visitor=lambda f: written.append({"path": Path(f.path).relative_to(tmp).as_posix(),
                                                   "rows": f.metadata.num_rows}))

        def upload(entry: dict) -> None:
            with open(Path(tmp, entry["path"]), "rb") as src, fs.open_output_stream(f"{base}/{entry['path']}") as out:
                shutil.copyfileobj(src, out, 8 << 20)  # streamed: a partition is never whole in memory

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(upload, written))
    return sorted(written, key=lambda f: f["path"])


def publish(settings: Settings, files: dict[str, Path], md5s: dict[str, str],
            timestamp: str) -> dict:
    """Upload the local ``features``/``labels`` Parquet files as a new version and
    publish it (the pointer last); returns the pointer's content."""
    from pyarrow.lib import ArrowException

    fs, base = filesystem(settings), root(settings)
    before = current(settings)
    version = _version(md5s["features"])
    pointer = {"version": version, "written_at": datetime.now(timezone.utc).isoformat(), "tables": {}}
    try:
        for name in TABLES:
            prefix = f"{base}/{name}/{version}"
            pointer["tables"][name] = {"uri": f"s3://{prefix}", "md5": md5s[name],
                                       "files": _write_table(fs, files[name], prefix, timestamp)}
            log.info("lakehouse: %s written to s3://%s (%d file(s))", name, prefix,
                     len(pointer["tables"][name]["files"]))
        with fs.open_output_stream(f"{base}/{POINTER}") as out:
            out.write(json.dumps(pointer, indent=2, sort_keys=True).encode())
        _prune(fs, base, {version, *([before["version"]] if before else [])})
    except (OSError, ArrowException) as exc:
        raise ObjectStoreError(f"lakehouse: cannot write to the object store at {settings.s3_endpoint} "
                               f"bucket {settings.s3_bucket} ({_short(exc)}); check that it runs, the bucket "
                               "exists and the identity may write, then re-run the features stage") from None
    return pointer


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _prune(fs, base: str, keep: set[str]) -> None:
    """Delete every version but ``keep`` (the published one and the one before):
    older ones, and what killed writes left, which no pointer ever named."""
    from pyarrow.fs import FileSelector, FileType

    for name in TABLES:
        found = fs.get_file_info(FileSelector(f"{base}/{name}", allow_not_found=True))
        for stale in sorted(i.base_name for i in found if i.type == FileType.Directory and i.base_name not in keep):
            log.info("lakehouse: deleting version %s/%s (no pointer names it)", name, stale)
            fs.delete_dir(f"{base}/{name}/{stale}")


# ------------------------------------------------------------------- read
def current(settings: Settings) -> dict | None:
    """The published pointer, or None when nothing is published yet."""
    from pyarrow.lib import ArrowException

    fs = filesystem(settings)
    try:
        with fs.open_input_stream(f"{root(settings)}/{POINTER}") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except (OSError, ArrowException) as exc:
        raise ObjectStoreError(f"lakehouse: cannot read {POINTER} from the object store at "
                               f"{settings.s3_endpoint} ({_short(exc)}); check that it runs and the "
                               "identity may read") from None


def table_md5(settings: Settings, name: str) -> str | None:
    """The md5 of the published ``features``/``labels`` (of the Parquet file they
    were made from), or of the file on the volume; None when there is none."""
    from pipeline.io import file_md5

    if not enabled(settings):
        path = settings.features_path if name == "features" else settings.labels_path
        return file_md5(path) if path.is_file() else None
    pointer = current(settings)
    return pointer["tables"][name]["md5"] if pointer else None


def table_uri(settings: Settings, name: str) -> str:
    """Where readers find ``features``/``labels``: the published version's
    ``s3://`` URI, or the file on the volume."""
    if not enabled(settings):
        return str(settings.features_path if name == "features" else settings.labels_path)
    pointer = current(settings)
    if pointer is None:
        raise ObjectStoreError("lakehouse: no features are published in the object store yet; run the "
                               "features stage (`python -m pipeline features`)")
    return pointer["tables"][name]["uri"]


def dataset(settings: Settings, name: str) -> ds.Dataset:
    """``features`` or ``labels`` as a pyarrow dataset, wherever they live: the
    Parquet file on the volume, or the published version in the store (without
    the partition column). Read it with ``.to_table(columns=...)`` or, in
    bounded memory, ``.to_batches(columns=..., batch_size=...)``."""
    uri = table_uri(settings, name)
    if not uri.startswith("s3://"):
        return ds.dataset(uri, format="parquet")
    fs = filesystem(settings)
    found = ds.dataset(uri.removeprefix("s3://"), filesystem=fs, format="parquet", partitioning="hive")
    keep = [f for f in found.schema if f.name != PARTITION]
    return ds.dataset(uri.removeprefix("s3://"), filesystem=fs, format="parquet", schema=pa.schema(keep))


def fingerprint_of(pointer: dict | None) -> str | None:
    """A short id of a published version (for run records)."""
    if pointer is None:
        return None
    return hashlib.sha256(json.dumps(pointer, sort_keys=True).encode()).hexdigest()[:16]


def dvc_remote_url(settings: Settings) -> str:
    return f"s3://{root(settings)}/dvc"


@contextlib.contextmanager
def local_copy(settings: Settings, name: str) -> Iterator[Path]:
    """Table ``name`` as one local Parquet file: the volume's own file, or, with the
    lakehouse on, the published version streamed batch by batch into a temporary
    file on the volume (memory: one batch), removed afterwards."""
    if not settings.lakehouse_uri:
        yield settings.features_path if name == "features" else settings.labels_path
        return
    source = dataset(settings, name)
    settings.features_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{name}-copy-", dir=settings.features_dir) as folder:
        path = Path(folder) / f"{name}.parquet"
        with pq.ParquetWriter(path, source.schema) as writer:
            for batch in source.to_batches(use_threads=False):
                writer.write_batch(batch)
        yield path
