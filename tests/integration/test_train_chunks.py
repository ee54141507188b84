"""Train in chunks is train in one piece: with the point-in-time retrieval split
into several chunks (each through Feast's historical retrieval), train gets the
model, metrics, counts and reference that the pipeline's run (one retrieval
over every label) registered. Real Feast, real MLflow store; no Docker needed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.dataset import CUSTOMERS as schema
from pipeline.io import read_record
from pipeline.train import train_model
from pipeline.train_data import training_chunks

pytestmark = pytest.mark.integration

CHUNK = 1000  # the smallest MLOPS_TRAIN_CHUNK_ROWS; the session's pipeline has 3000 rows


@pytest.fixture
def chunked(sqlite_pipeline):
    assert sqlite_pipeline.rows >= 3 * CHUNK and sqlite_pipeline.train_chunk_rows >= sqlite_pipeline.rows
    return sqlite_pipeline.model_copy(update={"train_chunk_rows": CHUNK})


def test_several_chunks_give_the_one_chunk_model(chunked):
    record = read_record(chunked.runs_dir, "train").outputs  # one chunk
    fit, gathered, train, holdout = train_model(chunked, schema, 0.2)
    assert record["rows"] == gathered.rows > 0.99 * chunked.rows
    assert record["holdout_rows"] == gathered.holdout_rows > 0
    one_chunk = np.array([record["coefficients"][name] for name in schema.feature_names])
    x = np.random.default_rng(0).uniform(0, 100, (50, len(schema.feature_names)))
    np.testing.assert_allclose(record["intercept"] + x @ one_chunk, fit.predict(x), rtol=1e-9)
    assert record["metrics"]["holdout_rmse"] == pytest.approx(holdout.metrics()["rmse"], rel=1e-9)
    assert record["metrics"]["train_mae"] == pytest.approx(train.metrics()["mae"], rel=1e-9)
    # the monitor's reference comes from a sample that does not depend on the chunking
    reference = record["reference"]
    assert reference["rows"] == gathered.train_rows
    assert reference["event_time_max"] == gathered.event_time_max.isoformat()
    assert json.dumps(reference["features"]["age"]["edges"]) == json.dumps(
        np.unique(np.quantile(gathered.sample.loc[~gathered.sample["held"], "age"],
                              np.linspace(0, 1, 11)[1:-1])).tolist())


def test_each_chunk_is_a_bounded_slice_and_together_they_are_every_label(chunked, tmp_path):
    whole = chunked.model_copy(update={"train_chunk_rows": 10 * chunked.rows})
    one = next(iter(training_chunks(whole, schema, tmp_path)))
    pieces = list(training_chunks(chunked, schema, tmp_path))
    assert len(pieces) == -(-len(one) // CHUNK) >= 3
    assert max(len(p) for p in pieces) < 2 * CHUNK
    keys = [set(p[schema.join_key]) for p in pieces]
    assert all(a.isdisjoint(b) for i, a in enumerate(keys) for b in keys[i + 1:])  # an entity in one chunk
    columns = [schema.join_key, schema.timestamp, *schema.feature_names, schema.target]
    together = pd.concat(pieces)[columns].sort_values([schema.join_key, schema.timestamp], ignore_index=True)
    pd.testing.assert_frame_equal(together, one[columns].sort_values([schema.join_key, schema.timestamp],
                                                                     ignore_index=True))
    assert not list(tmp_path.glob("*.parquet"))  # buckets are removed as they are used


def test_duckdb_joins_the_rows_feast_s_file_store_joins(sqlite_pipeline):
    """train's point-in-time join runs in Feast's DuckDB offline store; Feast's own file
    store (pandas, in memory) gives the same training rows and values for the same labels.
    (A label older than its entity's first features: DuckDB returns it with no features,
    the file store drops it; train drops such rows either way.)"""
    from feast import FeatureStore, RepoConfig

    from pipeline.feast import LOCAL_OFFLINE_STORE, _config_dict, repo_config
    from pipeline.train_data import _tidy, labels_dataset

    assert repo_config(sqlite_pipeline).offline_store.type == LOCAL_OFFLINE_STORE["type"] == "duckdb"
    labels = labels_dataset(sqlite_pipeline).to_table().to_pandas()
    # a label before any feature of its entity: DuckDB returns it without features, the file store drops it
    early = labels.iloc[[0]].assign(**{schema.timestamp: labels[schema.timestamp].min() - pd.Timedelta(days=1)})
    labels = pd.concat([labels, early], ignore_index=True)

    def joined(offline_store: dict) -> pd.DataFrame:
        config = RepoConfig(repo_path=sqlite_pipeline.feast_dir,
                            **{**_config_dict(sqlite_pipeline), "offline_store": offline_store})
        store = FeatureStore(config=config)
        engine = type(store._get_provider().offline_store).__name__  # the file store is Feast's Dask store
        assert engine == {"duckdb": "DuckDBOfflineStore", "file": "DaskOfflineStore"}[offline_store["type"]]
        frame = store.get_historical_features(entity_df=labels, features=schema.feature_refs()).to_arrow()
        return _tidy(frame, schema)[[schema.join_key, schema.timestamp, schema.target, *schema.feature_names]]

    duck, file = joined(LOCAL_OFFLINE_STORE), joined({"type": "file"})
    assert len(labels) - 1 == len(duck) > 0.99 * sqlite_pipeline.rows
    pd.testing.assert_frame_equal(duck, file, check_exact=True)


def test_no_bucket_s_tables_stay_in_duckdb_after_its_join(chunked, tmp_path):
    """ibis's default DuckDB connection keeps every table a retrieval registers (a bucket's
    Parquet view and its labels); left there, 40 buckets at 10^7 rows held 320 MiB more by
    the last one. While a bucket is being used, only its own tables are there."""
    import ibis

    ibis.options.default_backend = None  # what other tests' retrievals left is not this test's
    seen = [len(ibis.get_backend().list_tables()) for _ in training_chunks(chunked, schema, tmp_path)]
    assert len(seen) >= 3 and max(seen) <= 2, seen
