"""Train's data in chunks: labels joined point-in-time to their features by Feast.

A retrieval's result is held in memory (``to_arrow``), and Feast's file offline
store also reads its whole source into memory for every retrieval. So one
retrieval over all labels costs memory in proportion to the data, and one
retrieval per chunk over the whole source costs a full read per chunk.
Instead, one streaming pass splits the labels and the features into
``ceil(label rows / train_chunk_rows)`` buckets by a hash of the entity key
(every row of an entity lands in the same bucket, so a bucket holds all that
its point-in-time join needs), and each bucket's labels go through Feast's
``get_historical_features`` against a copy of the registered feature view
whose source is that bucket's features: Feast still does the join, within
memory set by the chunk size. With a single bucket on the volume, the
registered view is used as it is; the lakehouse's single bucket is still
split onto the volume, so train never joins through ``s3://``. The buckets are
local files, so their joins run in Feast's DuckDB offline store
(:data:`pipeline.feast.LOCAL_OFFLINE_STORE`) whatever the registered store is.

:func:`labels_dataset` and :func:`features_dataset` are where the tables are
read: any Parquet dataset pyarrow can open will do.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline import lakehouse
from pipeline.io import SCRATCH_PARQUET
from pipeline.feast import LOCAL_OFFLINE_STORE, open_store
from pipeline.schema import Schema
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# Salt of the bucket hash: unrelated to the holdout split's (which hashes the key with the seed).
BUCKET_HASH_KEY = "mlops-train-chnk"  # 16 characters, as SipHash takes


def labels_dataset(settings: Settings) -> ds.Dataset:
    """The labels (entity rows: key, event time, target) as a pyarrow dataset: the
    volume's file, or the lakehouse's published version in the object store."""
    return lakehouse.dataset(settings, "labels")


def features_dataset(settings: Settings) -> ds.Dataset:
    """The features Feast's view is defined over, as a pyarrow dataset (volume or lakehouse)."""
    return lakehouse.dataset(settings, "features")


def bucket_of(keys: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """Each key's bucket, ``0 .. buckets-1``: SipHash of the key, so any key type spreads evenly."""
    values = keys.to_numpy(zero_copy_only=False)
    if values.dtype == object:
        values = values.astype(str).astype(object)
    hashes = pd.util.hash_array(values, hash_key=BUCKET_HASH_KEY)
    return (hashes % np.uint64(buckets)).astype(np.int64)


def _batches(dataset: ds.Dataset) -> Iterator[pa.RecordBatch]:
    """Record batches of every file of ``dataset``, a few row groups' worth at a time.

    Not ``dataset.to_batches()``: its scanner reads a Parquet file far ahead of a
    slow consumer (most of the file at once, whatever the readahead options)."""
    for path in dataset.files:
        with dataset.filesystem.open_input_file(path) as handle:
            yield from pq.ParquetFile(handle, pre_buffer=False).iter_batches(batch_size=1 << 16)


def partition(dataset: ds.Dataset, key: str, buckets: int, folder: Path, name: str,
              flush_rows: int) -> list[Path]:
    """Stream ``dataset`` into ``folder/<name>-<i>.parquet``, one file per bucket of the key.

    Rows wait per bucket until ``flush_rows`` are pending in all, so memory is
    bounded by that and the files get row groups of a useful size."""
    paths = [folder / f"{name}-{i:05d}.parquet" for i in range(buckets)]
    writers: dict[int, pq.ParquetWriter] = {}
    pending: dict[int, list[pa.Table]] = {}
    waiting, schema = 0, None

    def flush() -> None:
        for i, tables in pending.items():
            if i not in writers:
                writers[i] = pq.ParquetWriter(paths[i], schema, **SCRATCH_PARQUET)
            writers[i].write_table(pa.concat_tables(tables))
        pending.clear()

    try:
        for batch in _batches(dataset):
            if not batch.num_rows:
                continue
            schema = schema or batch.schema
            table = pa.Table.from_batches([batch])
            which = bucket_of(batch.column(key), buckets)
            order = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[order], np.arange(buckets + 1))
            for i in np.flatnonzero(np.diff(bounds)):
                pending.setdefault(int(i), []).append(table.take(order[bounds[i]:bounds[i + 1]]))
            waiting += batch.num_rows
            if waiting >= flush_rows:
                flush()
                waiting = 0
        flush()
    finally:
        for writer in writers.values():
            writer.close()
    for i, path in enumerate(paths):
        if i not in writers:  # no key hashed here: an empty file keeps the buckets aligned
            pq.write_table((schema or dataset.schema).empty_table(), path)
    return paths


def _tidy(table: pa.Table, schema: Schema) -> pd.DataFrame:
    """A retrieval's rows that have every feature and the target, sorted by event
    time and key (the join's own order is arbitrary), as a pandas frame.

    In Arrow, not pandas: at 250000 rows a chunk's drop, cast and stable sort took
    a tenth of pandas' time. The event time becomes nanoseconds: DuckDB's join
    returns microseconds, the file store nanoseconds, and the sample's hash of
    (key, time) must not depend on the store."""
    keep = None
    for name in (*schema.feature_names, schema.target):
        column = table[name]
        present = pc.is_valid(column)
        if pa.types.is_floating(column.type):  # pandas' dropna drops NaN too
            present = pc.and_(present, pc.invert(pc.fill_null(pc.is_nan(column), True)))
        keep = present if keep is None else pc.and_(keep, present)
    if keep is not None:
        table = table.filter(keep)
    at = table.schema.get_field_index(schema.timestamp)
    table = table.set_column(at, schema.timestamp, pc.cast(table[schema.timestamp], pa.timestamp("ns", tz="UTC")))
    # sort_by is stable, as pandas' kind="stable" was
    table = table.sort_by([(schema.timestamp, "ascending"), (schema.join_key, "ascending")])
    return table.to_pandas().reset_index(drop=True)  # the file store's table carries pandas' index


def _own_store(folder: Path, project: str, provider: str, serialization: int, entity):
    """A Feast store in ``folder`` whose views read the buckets: local files, joined in DuckDB."""
    from feast import FeatureStore, RepoConfig

    config = RepoConfig(
        repo_path=folder, project=project, provider=provider,
        registry={"registry_type": "file", "path": str(folder / "registry.db"), "cache_ttl_seconds": 0},
        online_store={"type": "sqlite", "path": str(folder / "online_store.db")},
        offline_store=LOCAL_OFFLINE_STORE, entity_key_serialization_version=serialization)
    own = FeatureStore(config=config)
    own.registry.apply_entity(entity, own.project)
    return own


# ibis's default DuckDB connection is one per process and not safe across threads (a Dask
# worker may run several tasks at once): one bucket's join at a time, DuckDB's own threads
# use the cores meanwhile.
DUCKDB = threading.Lock()


def release_duckdb() -> None:
    """Let DuckDB free what a retrieval registered. Feast's DuckDB store runs on ibis's
    default connection, which keeps every table a retrieval made (the bucket's Parquet view
    and its labels: two tables and about 6 MiB per 250,000 labels, 320 MiB more at 10^7
    rows in 40 buckets). A new default connection per bucket drops the old one with them."""
    import ibis

    from pipeline.stage import release_freed_memory

    ibis.options.default_backend = None
    release_freed_memory()  # and what the bucket's frames held goes back too: the next starts low


def chunk_store(store, schema: Schema, folder: Path):
    """A Feast store of its own in ``folder`` (registry and a SQLite online store nobody
    reads) holding the registered entity; the buckets' views are applied to it."""
    return _own_store(folder, store.config.project, store.config.provider,
                      store.config.entity_key_serialization_version, store.get_entity(schema.entity))


def bucket_view(view, path: Path):
    """The registered view, reading ``path`` (one bucket's features) instead of its source."""
    from feast import FileSource

    source = view.batch_source
    chunk = copy.copy(view)
    chunk.batch_source = FileSource(name=source.name, path=str(path), timestamp_field=source.timestamp_field,
                                    created_timestamp_column=source.created_timestamp_column,
                                    field_mapping=dict(source.field_mapping))
    return chunk


def bucket_count(settings: Settings, labels: ds.Dataset, schema: Schema) -> int:
    rows = labels.count_rows()
    buckets = max(1, math.ceil(rows / settings.train_chunk_rows))
    log.info("train: historical retrieval of %d feature(s) for %d label rows in %d chunk(s)",
             len(schema.feature_names), rows, buckets)
    return buckets


def split_into_buckets(settings: Settings, schema: Schema, labels: ds.Dataset, buckets: int,
                       folder: Path) -> list[tuple[Path, Path]]:
    """``(labels, features)`` Parquet files of each bucket, in ``folder``."""
    flush_rows = settings.train_chunk_rows
    label_paths = partition(labels, schema.join_key, buckets, folder, "labels", flush_rows)
    feature_paths = partition(features_dataset(settings), schema.join_key, buckets, folder, "features",
                              flush_rows)
    return list(zip(label_paths, feature_paths))


def training_chunks(settings: Settings, schema: Schema, folder: Path) -> Iterator[pd.DataFrame]:
    """Labels with their point-in-time features, about ``train_chunk_rows`` rows at a time,
    each chunk sorted by event time and key; ``folder`` holds the buckets meanwhile."""
    store = open_store(settings)
    labels = labels_dataset(settings)
    buckets = bucket_count(settings, labels, schema)
    if buckets == 1 and not settings.lakehouse:  # the lakehouse's view reads s3://: split onto the volume
        with DUCKDB:
            frame = store.get_historical_features(entity_df=labels.to_table().to_pandas(),
                                                  features=schema.feature_refs()).to_arrow()
            release_duckdb()
        yield _tidy(frame, schema)
        return
    pairs = split_into_buckets(settings, schema, labels, buckets, folder)
    own = chunk_store(store, schema, folder)
    view = store.get_feature_view(schema.feature_view)
    for i, (label_path, feature_path) in enumerate(pairs):
        entity_df = pq.read_table(label_path).to_pandas()
        if len(entity_df):
            own.registry.apply_feature_view(bucket_view(view, feature_path), own.project)
            with DUCKDB:
                frame = own.get_historical_features(entity_df=entity_df, features=schema.feature_refs()).to_arrow()
                release_duckdb()
            del entity_df
            yield _tidy(frame, schema)
        label_path.unlink()
        feature_path.unlink()
        log.info("train: chunk %d of %d retrieved", i + 1, buckets)


@dataclass(frozen=True)
class BucketRetrieval:
    """What one bucket's point-in-time retrieval needs of the registered store, as
    plain picklable values: a Dask worker runs it with no settings (no secrets) and no
    access to the online store, reading only the bucket's files on the shared volume."""

    project: str
    provider: str
    serialization: int
    entity: object
    view: object
    schema: Schema

    @classmethod
    def of(cls, settings: Settings, schema: Schema) -> BucketRetrieval:
        store = open_store(settings)
        return cls(store.config.project, store.config.provider, store.config.entity_key_serialization_version,
                   store.get_entity(schema.entity),
                   store.get_feature_view(schema.feature_view), schema)

    def frame(self, label_path: Path, feature_path: Path, scratch: Path) -> pd.DataFrame | None:
        """The bucket's labels with their features (``None`` for a bucket without labels),
        through Feast with a registry of its own in a new folder under ``scratch``, removed
        after. The bucket's files are left alone: Dask may run the task again (its worker
        lost before the result was fetched), and the driver removes them once it has the result."""
        entity_df = pq.read_table(label_path).to_pandas()
        if not len(entity_df):
            return None
        # a folder of this attempt's own: a rerun, or a duplicate run of the task, never meets it
        registry = Path(tempfile.mkdtemp(prefix=f"registry-{label_path.stem}-", dir=scratch))
        try:
            own = _own_store(registry, self.project, self.provider, self.serialization, self.entity)
            own.registry.apply_feature_view(bucket_view(self.view, feature_path), own.project)
            with DUCKDB:
                try:
                    frame = own.get_historical_features(entity_df=entity_df,
                                                        features=self.schema.feature_refs()).to_arrow()
                finally:
                    release_duckdb()
            return _tidy(frame, self.schema)
        finally:
            shutil.rmtree(registry, ignore_errors=True)
