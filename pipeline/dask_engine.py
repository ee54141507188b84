"""Dask as the engine: the work that grows with the rows, spread over a Dask cluster.

With ``MLOPS_DASK_SCHEDULER`` set, the features stage validates each raw CSV part
on a worker of that cluster (``local``: a ``LocalCluster`` of worker processes
on this machine; ``tcp://host:8786``: an existing scheduler, such as the Dask
Kubernetes operator's). Each worker runs the very same
:func:`pipeline.features.transform` on its part and writes its Parquet and
quarantine pieces into a scratch folder beside the output, on storage every
worker sees (the shared volume); the stage then joins the pieces in part order,
row group by row group, so the files hold exactly the rows, values and order of
the single-process run, and memory stays one row group.

Train's buckets run on the same cluster (:mod:`pipeline.dask_train`), through
:func:`open_client` here. Unset, everything runs in the stage's own process, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import EngineUnavailable
from pipeline.io import TMP_PREFIX
from pipeline.schema import Schema
from pipeline.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10
LOCAL_WORKERS = 2


@contextlib.contextmanager
def open_client(settings: Settings) -> Iterator:
    """A Dask client on the configured scheduler (or a LocalCluster for ``local``)."""
    from distributed import Client, LocalCluster

    from pipeline import skip_feast_typechecks

    # importing distributed set its loggers to INFO: the cluster's start-up and shutdown
    # chatter (dozens of lines) would bury the stage's own progress
    logging.getLogger("distributed").setLevel(logging.WARNING)
    address = settings.dask_scheduler
    with contextlib.ExitStack() as stack:
        try:
            if address == "local":
                cluster = stack.enter_context(LocalCluster(
                    n_workers=min(os.cpu_count() or 1, LOCAL_WORKERS), threads_per_worker=1, processes=True,
                    host="127.0.0.1", dashboard_address=None, silence_logs=logging.WARNING))
                client = stack.enter_context(Client(cluster))
                # our own worker processes: Feast's classes left as written there too (as the
                # command line does; a user's own cluster gets it from --preload pipeline.dask_preload)
                client.run(skip_feast_typechecks)
            else:
                client = stack.enter_context(Client(address, timeout=CONNECT_TIMEOUT_SECONDS))
        except (OSError, TimeoutError) as exc:
            raise EngineUnavailable(
                f"cannot reach the Dask scheduler at {address} ({type(exc).__name__}); start it, or unset "
                "MLOPS_DASK_SCHEDULER to run in one process") from None
        workers = len(client.scheduler_info().get("workers", {}))
        log.info("dask: %d worker(s) on %s", workers, address)
        yield client


# How a lost scheduler or worker surfaces in the driver: distributed's comm errors are
# OSErrors (CommClosedError among them), its timeouts TimeoutErrors, and the run's futures
# are cancelled (FutureCancelledError) when the client loses the scheduler.
LOST = (OSError, TimeoutError, CancelledError)


def cluster_lost(address: str, stage: str, exc: BaseException, smaller: str = "") -> EngineUnavailable:
    """The one-line error for a cluster lost mid-run (scheduler or workers gone, the
    run's tasks cancelled, a task that killed its workers): what happened and what to do
    (``smaller``: how to make the stage's tasks smaller, such as a setting to lower)."""
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return EngineUnavailable(
            f"{stage}: a task killed each Dask worker that ran it, out of memory most likely; "
            f"give the workers more memory{', or ' + smaller if smaller else ''}, or unset "
            "MLOPS_DASK_SCHEDULER to run in one process")
    return EngineUnavailable(
        f"{stage}: the Dask cluster at {address} was lost mid-run ({type(exc).__name__}); check its "
        "scheduler and workers and run again, or unset MLOPS_DASK_SCHEDULER to run in one process")


def each_result(address: str, futures: list, stage: str, smaller: str = "") -> Iterator:
    """Each task's result as it finishes. A task's own error is raised as it is; a lost
    scheduler or worker (the tasks cancelled, a task that killed its workers, a comm
    error) as one :class:`~pipeline.errors.EngineUnavailable`."""
    from distributed import KilledWorker, as_completed

    # as_completed drops each future once yielded: a finished task's result does not stay on its worker
    tasks = as_completed(futures, with_results=True, raise_errors=False)
    while True:
        try:
            future, result = next(tasks)
        except StopIteration:
            return
        except LOST as exc:
            raise cluster_lost(address, stage, exc, smaller) from None
        if future.status == "error":
            _, exc, traceback = result
            if isinstance(exc, KilledWorker):
                raise cluster_lost(address, stage, exc, smaller) from None
            raise exc.with_traceback(traceback)
        if future.status == "cancelled" or isinstance(result, CancelledError):
            raise cluster_lost(address, stage, result, smaller) from None
        yield result


def _transform_part(part: str, scratch: str, index: int, schema: Schema, preferred_sample) -> dict:
    """On a worker: one raw part through the single-process transform, into scratch files."""
    from pipeline.features import transform

    base = Path(scratch) / f"{index:06d}"
    paths = {"features": f"{base}.features.parquet", "labels": f"{base}.labels.parquet",
             "rejected": f"{base}.rejected.csv"}
    stats = transform([Path(part)], Path(paths["features"]), Path(paths["labels"]), Path(paths["rejected"]),
                      schema, preferred_sample=preferred_sample)
    return {"stats": stats, "paths": paths}


def _concat_parquet(pieces: list[str], out: Path, schema) -> None:
    with pq.ParquetWriter(out, schema, use_dictionary=[schema.names[0]]) as writer:
        for piece in pieces:
            source = pq.ParquetFile(piece)
            for group in range(source.num_row_groups):
                writer.write_table(source.read_row_group(group))


def _concat_csv(pieces: list[str], out: Path) -> None:
    """The pieces' rows after one header (every piece starts with the same header line)."""
    with open(out, "wb") as target:
        for i, piece in enumerate(pieces):
            with open(piece, "rb") as source:
                header = source.readline()
                if i == 0:
                    target.write(header)
                shutil.copyfileobj(source, target, 1 << 20)


def merge_stats(parts: list[dict], preferred_sample) -> dict:
    """The single-process run's statistics from the per-part ones, in part order."""
    samples = [p["sample_entity"] for p in parts if p["sample_entity"] is not None]
    reasons: dict[str, int] = {}
    for p in parts:
        for column, count in p["quarantined_by_column"].items():
            reasons[column] = reasons.get(column, 0) + count
    times = {key: [datetime.fromisoformat(p[key]) for p in parts if p[key] is not None]
             for key in ("event_time_min", "event_time_max")}
    return {
        "rows_in": sum(p["rows_in"] for p in parts), "rows_out": sum(p["rows_out"] for p in parts),
        "rows_quarantined": sum(p["rows_quarantined"] for p in parts),
        "sample_entity": preferred_sample if preferred_sample is not None and preferred_sample in samples
        else (samples[0] if samples else None),
        "quarantined_by_column": reasons,
        "event_time_min": min(times["event_time_min"]).isoformat() if times["event_time_min"] else None,
        "event_time_max": max(times["event_time_max"]).isoformat() if times["event_time_max"] else None,
    }


def transform(settings: Settings, parts: list[Path], features_out: Path, labels_out: Path, rejected_out: Path,
              schema: Schema, preferred_sample=None) -> dict:
    """:func:`pipeline.features.transform` with one task per part on the Dask cluster."""
    from pipeline.features import features_schema, labels_schema

    # a temp name: a killed run's pieces are removed when the features stage next starts
    scratch = settings.features_dir / f"{TMP_PREFIX}dask-{uuid.uuid4().hex}"
    scratch.mkdir(parents=True)
    try:
        with open_client(settings) as client:
            futures = [client.submit(_transform_part, str(part), str(scratch), i, schema, preferred_sample,
                                     pure=False) for i, part in enumerate(parts)]
            try:
                for done, _ in enumerate(each_result(settings.dask_scheduler, futures, "features"), start=1):
                    log.info("features: %d/%d part(s) validated on dask", done, len(parts))
                results = client.gather(futures)  # in part order
            except BaseException:
                client.cancel(futures)
                raise
        _concat_parquet([r["paths"]["features"] for r in results], features_out, features_schema(schema))
        _concat_parquet([r["paths"]["labels"] for r in results], labels_out, labels_schema(schema))
        _concat_csv([r["paths"]["rejected"] for r in results], rejected_out)
        return merge_stats([r["stats"] for r in results], preferred_sample)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
