"""The whole DAG as a user runs it (``python -m pipeline``), against a real Redis
in a container, then ``/predict`` over a real socket from granian, checked
against MLflow's own client, Feast's own SDK and DVC's own CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest

from pipeline.dag import IDEMPOTENT
from pipeline.dataset import CUSTOMERS as schema
from pipeline.io import file_md5, read_record
from tests.conftest import clean_env, make_settings, pipeline_cli, running_server

pytestmark = [pytest.mark.integration, pytest.mark.docker]

ROWS, SEED = 4000, 11


@pytest.fixture(scope="module")
def run(redis_url, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared-redis")
    env = clean_env(MLOPS_SHARED_DIR=str(shared), MLOPS_REDIS_URL=redis_url)
    first = pipeline_cli(["run", "--rows", str(ROWS), "--seed", str(SEED)], env)
    return {"shared": shared, "env": env, "stdout": first.stdout,
            "settings": make_settings(shared, redis_url=redis_url, rows=ROWS, seed=SEED)}


@pytest.fixture(scope="module")
def server(run):
    with running_server(run["env"]) as base:
        yield base


def get_json(url: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def latest_features(settings) -> pd.DataFrame:
    feats = pd.read_parquet(settings.features_path)
    return feats.sort_values(schema.timestamp).groupby(schema.join_key).last()[list(schema.feature_names)]


def test_run_prints_the_summary(run):
    out = run["stdout"]
    assert f"rows generated    {ROWS}" in out
    assert "rows quarantined" in out and "DVC hash (raw)" in out
    assert "alias 'production' -> version 1" in out
    assert "entities into redis in Feast's layout" in out


def test_predict_over_a_socket_equals_parquet_features_times_coefficients(run, server):
    settings = run["settings"]
    latest = latest_features(settings)
    train = read_record(settings.runs_dir, "train").outputs
    coef = np.array([train["coefficients"][n] for n in schema.feature_names])
    ids = [1000, 1001, 1234, 1000 + ROWS // 5 - 1]
    answer = get_json(f"{server}/predict", {"instances": [{schema.join_key: i} for i in ids]})
    expected = train["intercept"] + latest.loc[ids].to_numpy() @ coef
    assert [p["prediction"] for p in answer["predictions"]] == pytest.approx(expected, rel=1e-9)
    assert answer["model"]["version"] == 1
    sample = get_json(f"{server}/predict")
    assert sample[schema.join_key] == 1000 and sample["prediction"] == pytest.approx(expected[0])


def test_mlflow_client_loads_the_production_model_and_agrees(run, server):
    import mlflow

    settings = run["settings"]
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/mlops-linear@production")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == list(schema.feature_names)
    latest = latest_features(settings)
    ids = [1002, 1003]
    ours = get_json(f"{server}/predict", {"instances": [{schema.join_key: i} for i in ids]})
    theirs = model.predict(latest.loc[ids].reset_index(drop=True))
    assert [p["prediction"] for p in ours["predictions"]] == pytest.approx(list(theirs), rel=1e-12)
    # the weights are JSON, the model is code: no pickle in the artifact
    local = mlflow.artifacts.download_artifacts("models:/mlops-linear@production")
    from pathlib import Path

    files = {p.name for p in Path(local).rglob("*") if p.is_file()}
    assert "weights.json" in files and not any(f.endswith((".pkl", ".pickle")) for f in files)


def test_feast_sdk_reads_the_online_store_with_no_glue(run, monkeypatch):
    from feast import FeatureStore

    settings = run["settings"]
    monkeypatch.setenv("MLOPS_REDIS_PASSWORD", settings.redis_parts()[3])
    store = FeatureStore(repo_path=str(settings.feast_dir))
    values = store.get_online_features(features=schema.feature_refs(),
                                       entity_rows=[{schema.join_key: 1005}]).to_dict()
    latest = latest_features(settings).loc[1005]
    assert [values[n][0] for n in schema.feature_names] == pytest.approx(latest.tolist())
    assert "password" not in (settings.feast_dir / "feature_store.yaml").read_text().split("${")[0] \
        or settings.redis_parts()[3] not in (settings.feast_dir / "feature_store.yaml").read_text()


def test_dvc_status_is_clean_with_dvcs_own_cli(run):
    proc = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=run["shared"], text=True,
                          capture_output=True, timeout=120, env=clean_env(DVC_NO_ANALYTICS="1"))
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout
    cloud = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud"], cwd=run["shared"],
                           text=True, capture_output=True, timeout=120, env=clean_env(DVC_NO_ANALYTICS="1"))
    assert "in sync" in cloud.stdout, cloud.stdout + cloud.stderr


def test_metrics_over_the_socket_add_up_both_workers(server):
    from pipeline.metrics import FLUSH_SECONDS

    for _ in range(10):
        get_json(f"{server}/predict")
    # each worker adds what it counted to the shared files at least every FLUSH_SECONDS
    deadline, counted = time.monotonic() + 3 * FLUSH_SECONDS, 0.0
    while counted < 10 and time.monotonic() < deadline:
        with urllib.request.urlopen(f"{server}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        counted = next((float(l.split()[-1]) for l in text.splitlines() if l.startswith(
            'mlops_http_requests_total{method="GET",route="/predict",status="200"}')), 0.0)
        time.sleep(0.1)
    assert counted >= 10
    assert "mlops_model_version 1.0" in text
    from tests.service.fakes import documented_families, exposed_families

    assert exposed_families(text) == documented_families()  # no feast_* family among them


def test_a_second_run_with_the_same_seed_changes_nothing(run, server):
    settings = run["settings"]
    raw = sorted(settings.raw_dir.glob("*.csv"))
    before = {p: p.stat().st_mtime_ns for p in raw}
    features_md5 = file_md5(settings.features_path)
    second = pipeline_cli(["run", "--rows", str(ROWS), "--seed", str(SEED)], run["env"])
    for stage in IDEMPOTENT:
        assert read_record(settings.runs_dir, stage).status == "skipped", stage
    assert second.stdout.count("up to date") >= 5
    assert {p: p.stat().st_mtime_ns for p in raw} == before
    assert file_md5(settings.features_path) == features_md5
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    versions = client.search_model_versions("name = 'mlops-linear'")
    assert [int(v.version) for v in versions] == [1]
    assert get_json(f"{server}/predict")["model"]["version"] == 1


def test_the_fast_redis_reader_reads_exactly_what_feast_sdk_reads(run):
    """serve reads Redis in Feast's layout with Feast's helpers: the same values
    as Feast's own get_online_features, for every entity, unknown ones included."""
    import redis

    from pipeline.feast import online_features, open_store
    from pipeline.online import RedisOnlineReader

    settings = run["settings"]
    host, port, db, password = settings.redis_parts()
    reader = RedisOnlineReader(redis.Redis(host=host, port=port, db=db, password=password), schema)
    ids = list(range(1000, 1000 + ROWS // 5)) + [5, 10**12]
    ours = reader.read(ids)
    theirs = online_features(open_store(settings), schema, ids)
    for i, entity in enumerate(ids):
        expected = [theirs[n][i] for n in schema.feature_names]
        if expected[0] is None:
            assert ours[i] is None, entity
        else:
            assert ours[i] == expected, entity  # bit for bit
    assert ours[-1] is None and ours[-2] is None
    assert sum(r is not None for r in ours) == ROWS // 5


def test_an_emptied_redis_is_not_ready_until_the_feast_stage_loads_it_again(run, server):
    """A Redis that restarted without its data answers PING, but /readyz says it holds no
    features; the feast stage notices the empty store and loads it again."""
    import redis as redis_py

    from tests.support import wait_until

    settings = run["settings"]
    host, port, db, password = settings.redis_parts()
    client = redis_py.Redis(host=host, port=port, db=db, password=password)
    client.flushdb()
    try:
        def status() -> tuple[int, dict]:
            try:
                return 200, get_json(f"{server}/readyz")
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        code, body = wait_until(lambda: (s := status())[0] == 503 and s, 10, "/readyz to fail")
        assert "holds no features" in body["online_store"] and host not in json.dumps(body)
    finally:
        out = pipeline_cli(["feast"], run["env"]).stdout
    assert "materializing again" in out or "online store lost its data" in out
    wait_until(lambda: status()[0] == 200, 10, "/readyz to pass again")
