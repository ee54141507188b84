"""Train's statistics on Dask: with a scheduler named, each bucket's point-in-time
retrieval and statistics run on a local cluster of separate worker processes, and
train registers the model, metrics and reference of the single-process run (to
1e-9), recording the engine in the MLflow run. Real Feast, real MLflow store."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.cli import run_stages
from pipeline.dask_engine import each_result
from pipeline.dask_train import SMALLER, _bucket
from pipeline.dataset import CUSTOMERS as schema
from pipeline.errors import EngineUnavailable
from pipeline.io import read_record
from pipeline.lstsq import ErrorSums, StreamedLeastSquares, fit_least_squares
from pipeline.registry import mlflow_session
from pipeline.train_data import BucketRetrieval, labels_dataset, split_into_buckets
from pipeline.train_stats import Merging, gather, merge
from tests.support import clean_env, free_port, make_settings, pipeline_cli
from tests.unit.test_numerics import exact_predictions, ill_conditioned, relative_error

pytestmark = pytest.mark.integration

ROWS = 12_000
CHUNK = 2_500  # five buckets: five tasks


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def trained_both_ways(tmp_path_factory, cluster):
    """The pipeline once in one process; then train again, on Dask, as another model
    (the same data, Feast and MLflow store; a new name, so it is not skipped as done)."""
    shared = tmp_path_factory.mktemp("shared-dask-train")
    single = make_settings(shared, rows=ROWS, train_chunk_rows=CHUNK)
    run_stages(single, ["ingest", "features", "feast", "train"])
    expected = read_record(single.runs_dir, "train").outputs
    on_dask = make_settings(shared, rows=ROWS, train_chunk_rows=CHUNK, dask_scheduler=cluster,
                            model_name=f"{single.model_name}-dask")
    run_stages(on_dask, ["train"])
    return single, expected, on_dask, read_record(on_dask.runs_dir, "train").outputs


def test_train_on_dask_registers_the_single_process_model(trained_both_ways):
    _, expected, on_dask, got = trained_both_ways
    assert expected["train_chunks"] == got["train_chunks"] == -(-ROWS // CHUNK)
    for key in ("rows", "train_rows", "holdout_rows", "scored_on"):
        assert got[key] == expected[key], key
    names = schema.feature_names
    x = np.random.default_rng(0).uniform(0, 100, (200, len(names)))
    predict = [r["intercept"] + x @ np.array([r["coefficients"][n] for n in names]) for r in (expected, got)]
    np.testing.assert_allclose(predict[1], predict[0], rtol=1e-9)
    np.testing.assert_allclose([got["coefficients"][n] for n in names],
                               [expected["coefficients"][n] for n in names], rtol=1e-9)
    assert got["metrics"].keys() == expected["metrics"].keys()
    for key, value in expected["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-9), key
    # the monitor's reference: the same sample, so the same bins, counts and newest event time
    ref, want = got["reference"], expected["reference"]
    assert {k: ref[k] for k in ("rows", "sample_rows", "event_time_max")} == \
        {k: want[k] for k in ("rows", "sample_rows", "event_time_max")}
    assert json.dumps(ref["features"]) == json.dumps(want["features"])
    assert not list(on_dask.shared.glob(".tmp-train-*")), "the buckets and spills were left behind"


def test_the_mlflow_run_records_the_engine(trained_both_ways):
    single, expected, _, got = trained_both_ways
    assert (expected["engine"], got["engine"]) == ("single process", "dask")
    with mlflow_session(single, schema):
        client = MlflowClient()
        engines = {name: client.get_run(record["run_id"]).data.params["engine"]
                   for name, record in (("single", expected), ("dask", got))}
    assert engines == {"single": "single process", "dask": "dask"}


def test_the_merge_does_not_depend_on_the_order_tasks_finish():
    """The driver merges bucket results as they arrive: any arrival order, the same bits."""
    rng = np.random.default_rng(3)
    frames = []
    for bucket in range(4):
        x = rng.uniform(0, 1e3, (300, len(schema.feature_names)))
        frame = {name: x[:, i] for i, name in enumerate(schema.feature_names)}
        frame[schema.join_key] = np.arange(300) + 1000 * bucket
        frame[schema.timestamp] = np.datetime64("2024-01-01", "ns") + np.arange(300).astype("timedelta64[s]")
        frame[schema.target] = x @ np.arange(1.0, len(schema.feature_names) + 1) + rng.normal(0, 1, 300)
        frames.append(pd.DataFrame(frame))
    parts = [(i, gather([f], schema, 0.2, 7, sample_rows=500, check=False)) for i, f in enumerate(frames)]
    one_pass = gather(frames, schema, 0.2, 7, sample_rows=500)
    forward = merge(parts, len(schema.feature_names), 500)
    backward = merge(parts[::-1], len(schema.feature_names), 500)
    assert np.array_equal(forward.train.r, backward.train.r)
    assert forward.sample.equals(backward.sample) and forward.sample.equals(one_pass.sample)
    np.testing.assert_allclose(forward.train.fit().coefficients, one_pass.train.fit().coefficients, rtol=1e-9)
    # as the driver folds them: never more than one sample held, whatever the buckets' number
    merging = Merging(len(schema.feature_names), 500)
    for index, part in (parts[2], parts[0], parts[3], parts[1]):
        merging.add(index, part)
        assert len(merging.rows) <= 500
    folded = merging.result()
    assert np.array_equal(folded.train.r, forward.train.r) and folded.sample.equals(one_pass.sample)


def test_a_scheduler_that_does_not_answer_stops_train_in_one_line(trained_both_ways):
    single = trained_both_ways[0]
    address = f"tcp://127.0.0.1:{free_port()}"
    env = clean_env(MLOPS_SHARED_DIR=str(single.shared), MLOPS_ROWS=str(ROWS), MLOPS_DASK_SCHEDULER=address,
                    MLOPS_MODEL_NAME="unreachable", MLOPS_TRAIN_CHUNK_ROWS=str(CHUNK))
    proc = pipeline_cli(["train"], env, check=False)
    assert proc.returncode == 12, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot reach the Dask scheduler at {address}" in proc.stderr
    assert not list(single.shared.glob(".tmp-train-*"))


def test_a_bucket_task_run_again_gives_the_same_result(trained_both_ways, tmp_path):
    """Dask reruns a task whose worker was lost before its result was fetched: the
    task must find its inputs (it never removes them) and give the same result."""
    on_dask = trained_both_ways[2]
    pairs = split_into_buckets(on_dask, schema, labels_dataset(on_dask), 3, tmp_path)
    retrieval = BucketRetrieval.of(on_dask, schema)
    labels_path, features_path = pairs[1]
    first, again = (_bucket(retrieval, 1, str(labels_path), str(features_path), 0.2, 7, 500) for _ in range(2))
    assert labels_path.exists() and features_path.exists()
    assert first[2] != again[2] and pd.read_parquet(first[2]).equals(pd.read_parquet(again[2]))
    assert np.array_equal(first[1].train.r, again[1].train.r) and first[1].sample.equals(again[1].sample)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("labels-", "features-",
                                                                               "scored-"))) == []


def _fail(message: str) -> None:
    raise ValueError(message)


def _die() -> None:
    os._exit(1)


def test_a_lost_cluster_is_one_engine_error_and_a_task_error_is_its_own(cluster):
    """Tasks cancelled (as when the client loses the scheduler) or a task that kills its
    worker: EngineUnavailable, the one-line exit 12 of train and of the features stage
    (both read their tasks through each_result); a task's own error stays itself."""
    import dask
    from distributed import Client, LocalCluster

    with Client(cluster) as client:
        futures = [client.submit(time.sleep, 1, pure=False)]
        client.cancel(futures)
        with pytest.raises(EngineUnavailable, match=f"the Dask cluster at {cluster} was lost mid-run"):
            list(each_result(cluster, futures, "train", SMALLER))
        with pytest.raises(ValueError, match="the task's own"):
            list(each_result(cluster, [client.submit(_fail, "the task's own", pure=False)], "train"))
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None) as fragile, Client(fragile) as client, \
            pytest.raises(EngineUnavailable, match="killed each Dask worker.*MLOPS_TRAIN_CHUNK_ROWS") as caught:
        list(each_result(fragile.scheduler_address, [client.submit(_die, pure=False)], "train", SMALLER))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("sizes", [[1], [3], [2, 7, 1, 40], [17]], ids=lambda s: "buckets-" + "-".join(map(str, s)))
def test_triangles_of_separate_buckets_merge_to_the_in_memory_fit(sizes):
    """Each bucket on its own (its own shift, as a worker computes it), merged: the
    in-memory fit and the exact solution to 1e-9 on the badly conditioned table;
    the merged error sums are those of all rows at once."""
    x, y = ill_conditioned()
    merged, start, i, sums = StreamedLeastSquares(x.shape[1]), 0, 0, ErrorSums()
    want = fit_least_squares(x, y)
    while start < len(x):
        stop = start + sizes[i % len(sizes)]
        bucket = StreamedLeastSquares(x.shape[1])
        bucket.add(x[start:stop], y[start:stop])
        merged.merge(bucket)
        part = ErrorSums()
        part.add(y[start:stop], want.predict(x[start:stop]))
        sums.merge(part)
        start, i = stop, i + 1
    got = merged.fit().predict(x)
    assert relative_error(got, want.predict(x)) < 1e-9
    assert relative_error(got, exact_predictions(x, y)) < 1e-9
    whole = ErrorSums()
    whole.add(y, want.predict(x))
    for key, value in whole.metrics().items():
        assert sums.metrics()[key] == pytest.approx(value, rel=1e-9), key
