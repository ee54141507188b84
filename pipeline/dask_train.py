"""Train's statistics on Dask: one task per bucket of labels, the small results merged.

With ``MLOPS_DASK_SCHEDULER`` set, train splits the labels and features into
buckets by entity key as it does in one process (:mod:`pipeline.train_data`,
one streaming pass, on the volume), then hands each bucket to a worker: the
worker runs Feast's point-in-time retrieval of the bucket and
:func:`pipeline.train_stats.gather` over it, spills the bucket's rows beside
the buckets and returns its counts, newest event time, R factor and the
lowest-hash rows of its sample (up to ``sample_rows``). The stage folds each
result in as it arrives (:class:`pipeline.train_stats.Merging`: the sample cut
back to ``sample_rows`` by the same hash rule at once, the R factors merged in
bucket order whatever order the tasks finish in), so it holds one sample and
small triangles, not a sample per bucket; it solves, and has the workers score
their spills against the fit; the error sums are merged in bucket order too.
The model, metrics and reference equal the single-process run's to rounding
(1e-9 relative): the same rows, the same sample, the same solver on the same
triangle up to the order of the rotations.

A task never removes its inputs: Dask runs it again if the worker holding its
result is lost before the stage fetched it. The stage removes a bucket's files
once its result has arrived, and a spill once it is scored. A scheduler or
worker lost mid-run stops train with one :class:`pipeline.errors.EngineUnavailable`
line (exit 12), the run's tasks cancelled.

Workers read and write the bucket files under the stage's temporary folder on
the shared volume, so they must mount it at the same path (the features
engine's requirement too). They get no settings: no Redis or S3 secret goes
to the cluster.
"""

from __future__ import annotations

import gc
import logging
import uuid
from pathlib import Path

from pipeline.dask_engine import LOST, cluster_lost, each_result, open_client
from pipeline.lstsq import ErrorSums, Fit
from pipeline.schema import Schema
from pipeline.settings import Settings
from pipeline.train_data import (
    BucketRetrieval,
    bucket_count,
    labels_dataset,
    split_into_buckets,
)
from pipeline.train_stats import (
    SAMPLE_ROWS,
    Gathered,
    Merging,
    check_split,
    gather,
    score,
)

log = logging.getLogger(__name__)

SMALLER = "lower MLOPS_TRAIN_CHUNK_ROWS"


def _bucket(retrieval: BucketRetrieval, index: int, label_path: str, feature_path: str, holdout_fraction: float,
            seed: int, sample_rows: int) -> tuple[int, Gathered, str | None]:
    """On a worker: one bucket retrieved and gathered; its rows spilled beside it for scoring.

    Reads its inputs and never removes them (the driver does, once it has the result):
    Dask runs a task again when the worker holding its result is lost before the
    driver fetched it. Every file it writes has a name of this attempt's own."""
    import dask

    folder = Path(label_path).parent
    # The join runs in DuckDB (one at a time per worker process: train_data.DUCKDB). Should
    # anything in Feast compute with Dask inside a task, it would hand its graph back to
    # the cluster: this task's thread runs it instead
    with dask.config.set(scheduler="synchronous"):
        frame = retrieval.frame(Path(label_path), Path(feature_path), folder)
    if frame is None:  # no label hashed here: nothing to count, as in one process
        return index, gather([], retrieval.schema, holdout_fraction, seed, check=False), None
    spill = folder / f"scored-{index:05d}-{uuid.uuid4().hex}.parquet"
    gathered = gather([frame], retrieval.schema, holdout_fraction, seed, spill, sample_rows, check=False)
    del frame
    gc.collect()  # a retrieval leaves reference cycles; the next task should not pile on them
    return index, gathered, str(spill)


def _score(index: int, fit: Fit, spill: str, schema: Schema) -> tuple[int, ErrorSums, ErrorSums]:
    """On a worker: the error sums of one bucket's spilled rows (the driver removes the spill)."""
    return (index, *score(fit, Path(spill), schema))


def train_model(settings: Settings, schema: Schema, holdout_fraction: float, folder: Path,
                sample_rows: int = SAMPLE_ROWS) -> tuple[Fit, Gathered, ErrorSums, ErrorSums]:
    """:func:`pipeline.train.train_model` with one task per bucket on the Dask cluster;
    ``folder`` (on the shared volume) holds the buckets and spills meanwhile."""
    address = settings.dask_scheduler
    with open_client(settings) as client:  # first: a scheduler that does not answer stops train at once
        labels = labels_dataset(settings)
        # one bucket is still split (a copy): the workers then read only the volume, never the lakehouse
        pairs = split_into_buckets(settings, schema, labels, bucket_count(settings, labels, schema), folder)
        futures: list = []
        try:
            try:
                shared = client.scatter(BucketRetrieval.of(settings, schema), broadcast=True)
            except LOST as exc:
                raise cluster_lost(address, "train", exc, SMALLER) from None
            futures = [client.submit(_bucket, shared, i, str(labels_path), str(features_path), holdout_fraction,
                                     settings.seed, sample_rows, pure=False)
                       for i, (labels_path, features_path) in enumerate(pairs)]
            # each result folded in as it arrives and dropped: the driver holds one sample and
            # small triangles, whatever the number of buckets
            merging, spills = Merging(len(schema.feature_names), sample_rows), {}
            for done, (index, gathered, spill) in enumerate(each_result(address, futures, "train", SMALLER), start=1):
                merging.add(index, gathered)
                del gathered
                if spill is not None:
                    spills[index] = spill
                for path in pairs[index]:  # its task is done and its result here: no rerun needs them
                    path.unlink(missing_ok=True)
                log.info("train: %d/%d chunk(s) retrieved and reduced on dask", done, len(pairs))
            futures = []
            total = merging.result()
            check_split(total.train_rows, total.holdout_rows, holdout_fraction)
            fit = total.train.fit()
            futures = [client.submit(_score, index, fit, spill, schema, pure=False)
                       for index, spill in spills.items()]
            sums = {}
            for index, train, holdout in each_result(address, futures, "train", SMALLER):
                sums[index] = (train, holdout)
                Path(spills[index]).unlink(missing_ok=True)
            futures = []
        except BaseException:
            # nothing more to compute for this run: the cluster is free for the next one
            if futures:
                try:
                    client.cancel(futures)
                except Exception:  # the cluster may be gone already; the error at hand says why
                    log.debug("train: cancelling the tasks failed", exc_info=True)
            raise
    train, holdout = ErrorSums(), ErrorSums()
    for index in sorted(sums):  # in bucket order, whatever order the tasks finished in
        train.merge(sums[index][0])
        holdout.merge(sums[index][1])
    log.info("train: %d row(s) scored on dask, %d of them held out", train.n + holdout.n, holdout.n)
    return fit, total, train, holdout
