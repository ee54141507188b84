"""Train's statistics on Dask: one task per bucket of labels, the small results merged.

With ``MLOPS_DASK_SCHEDULER`` set, train splits the labels and features into
buckets by entity key as it does in one process (:mod:`pipeline.train_data`,
one streaming pass, on the volume), then hands each bucket to a worker: the
worker runs Feast's point-in-time retrieval of the bucket and
:func:`pipeline.train_stats.gather` over it, spills the bucket's rows beside
the buckets and returns what is small: the bucket's R factor, counts, newest
event time and the lowest-hash rows of its sample. The stage merges them
(:func:`pipeline.train_stats.merge`: the R factors in bucket order, whatever
order the tasks finish in), solves, and has the workers score their spills
against the fit; the error sums are merged in bucket order too. The model,
metrics and reference equal the single-process run's to rounding (1e-9
relative): the same rows, the same sample, the same solver on the same
triangle up to the order of the rotations.

Workers read and write the bucket files under the stage's temporary folder on
the shared volume, so they must mount it at the same path (the features
engine's requirement too). They get no settings: no Redis or S3 secret goes
to the cluster.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from pipeline.dask_engine import open_client
from pipeline.lstsq import ErrorSums, Fit
from pipeline.schema import Schema
from pipeline.settings import Settings
from pipeline.train_data import BucketRetrieval, bucket_count, labels_dataset, split_into_buckets
from pipeline.train_stats import SAMPLE_ROWS, Gathered, check_split, gather, merge, score

log = logging.getLogger(__name__)


def _bucket(retrieval: BucketRetrieval, index: int, label_path: str, feature_path: str, holdout_fraction: float,
            seed: int, sample_rows: int) -> tuple[int, Gathered, str | None]:
    """On a worker: one bucket retrieved and gathered; its rows spilled beside it for scoring."""
    import dask

    folder = Path(label_path).parent
    # Feast's file offline store computes with Dask itself: inside a task that would hand its
    # graph (a shuffle) back to the cluster; this worker's one thread runs it instead
    with dask.config.set(scheduler="synchronous"):
        frame = retrieval.frame(Path(label_path), Path(feature_path), folder / f"registry-{index:05d}")
    if frame is None:  # no label hashed here: nothing to count, as in one process
        return index, gather([], retrieval.schema, holdout_fraction, seed, check=False), None
    spill = folder / f"scored-{index:05d}.parquet"
    gathered = gather([frame], retrieval.schema, holdout_fraction, seed, spill, sample_rows, check=False)
    del frame
    gc.collect()  # a retrieval leaves reference cycles; the next task should not pile on them
    return index, gathered, str(spill)


def _score(index: int, fit: Fit, spill: str, schema: Schema) -> tuple[int, ErrorSums, ErrorSums]:
    """On a worker: the error sums of one bucket's spilled rows; the spill is removed."""
    try:
        return (index, *score(fit, Path(spill), schema))
    finally:
        Path(spill).unlink(missing_ok=True)


def train_model(settings: Settings, schema: Schema, holdout_fraction: float, folder: Path,
                sample_rows: int = SAMPLE_ROWS) -> tuple[Fit, Gathered, ErrorSums, ErrorSums]:
    """:func:`pipeline.train.train_model` with one task per bucket on the Dask cluster;
    ``folder`` (on the shared volume) holds the buckets and spills meanwhile."""
    from distributed import as_completed

    with open_client(settings) as client:  # first: a scheduler that does not answer stops train at once
        labels = labels_dataset(settings)
        # one bucket is still split (a copy): the workers then read only the volume, never the lakehouse
        pairs = split_into_buckets(settings, schema, labels, bucket_count(settings, labels, schema), folder)
        shared = client.scatter(BucketRetrieval.of(settings, schema), broadcast=True)
        parts, spills = [], {}
        # as_completed drops each future once yielded: a finished bucket's result does not stay on its worker
        tasks = as_completed([client.submit(_bucket, shared, i, str(labels_path), str(features_path),
                                            holdout_fraction, settings.seed, sample_rows, pure=False)
                              for i, (labels_path, features_path) in enumerate(pairs)], with_results=True)
        for done, (_, (index, gathered, spill)) in enumerate(tasks, start=1):
            parts.append((index, gathered))
            if spill is not None:
                spills[index] = spill
            log.info("train: %d/%d chunk(s) retrieved and reduced on dask", done, len(pairs))
        total = merge(parts, len(schema.feature_names), sample_rows)
        del parts
        check_split(total.train_rows, total.holdout_rows, holdout_fraction)
        fit = total.train.fit()
        scored = client.gather([client.submit(_score, index, fit, spill, schema, pure=False)
                                for index, spill in spills.items()])
    sums = {index: (train, holdout) for index, train, holdout in scored}
    train, holdout = ErrorSums(), ErrorSums()
    for index in sorted(sums):  # in bucket order, whatever order the tasks finished in
        train.merge(sums[index][0])
        holdout.merge(sums[index][1])
    log.info("train: %d row(s) scored on dask, %d of them held out", train.n + holdout.n, holdout.n)
    return fit, total, train, holdout

