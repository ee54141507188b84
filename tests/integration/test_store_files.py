"""Store files deleted and rebuilt under a live app: the MLflow SQLite store and
Feast's SQLite online store. While a file is missing /readyz fails and says
which; once the pipeline has rebuilt them, the app reads the new files (not
the deleted ones its connections held open) and answers exactly as a freshly
started app does. Real pipeline runs, no Docker needed."""

from __future__ import annotations

import json

import pytest
from werkzeug.test import Client

from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES as STAGES
from pipeline.dataset import CUSTOMERS as schema
from pipeline.serve import create_app
from tests.support import clean_env, make_settings, pipeline_cli

pytestmark = pytest.mark.integration


def body(resp) -> dict:
    return json.loads(resp.get_data())


def test_deleted_and_rebuilt_store_files_are_reopened(tmp_path):
    settings = make_settings(tmp_path, rows=2000, seed=7)
    run_stages(settings, STAGES)
    app = create_app(settings, watch=False)
    client = Client(app)
    entity = 1005
    before = body(client.get(f"/predict?{schema.join_key}={entity}"))
    assert client.get("/readyz").status_code == 200

    mlflow_db = settings.mlflow_dir / "mlflow.db"
    online_db = settings.feast_dir / "online_store.db"
    mlflow_db.unlink()
    online_db.unlink()
    app.watcher.refresh()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    text = ready.get_data(as_text=True)
    assert "online store's file is missing" in text and "model registry's store is missing" in text
    assert str(tmp_path) not in text  # words, not paths
    assert not mlflow_db.exists()  # serving did not create an empty store in its place
    missing = client.get(f"/predict?{schema.join_key}={entity}")
    assert missing.status_code == 503 and "file is missing" in body(missing)["message"]

    # the pipeline rebuilds both (other data: another seed) in its own process, as an
    # operator would run it, the app still running
    pipeline_cli(["run", "--rows", "2000", "--seed", "8"], clean_env(MLOPS_SHARED_DIR=str(tmp_path)))
    rebuilt = make_settings(tmp_path, rows=2000, seed=8)
    assert app.watcher.refresh() is True  # the new store's version 1 is another model
    ready = body(client.get("/readyz"))
    assert ready["ready"] and "model_registry" not in ready
    after = body(client.get(f"/predict?{schema.join_key}={entity}"))
    fresh = body(Client(create_app(rebuilt, watch=False)).get(f"/predict?{schema.join_key}={entity}"))
    assert after["features"] == fresh["features"] != before["features"]
    assert after["prediction"] == fresh["prediction"]


def test_a_new_folders_mlflow_store_is_made_ahead_by_another_process(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.cli import tracking_store_ahead
    from pipeline.io import TMP_PREFIX

    settings = make_settings(tmp_path / "new", rows=100)
    db = settings.mlflow_dir / "mlflow.db"
    with tracking_store_ahead(settings, ["ingest", "features", "train"]) as ready:
        ready()  # what the run calls before train
        assert db.exists()
    assert [e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()] == ["Default"]
    assert not [p.name for p in settings.mlflow_dir.iterdir() if p.name.startswith(TMP_PREFIX)]
    # nothing made when train runs first or not at all
    other = make_settings(tmp_path / "other", rows=100)
    for names in (["train", "promote"], ["ingest", "features"]):
        with tracking_store_ahead(other, names) as ready:
            ready()
        assert not (other.mlflow_dir / "mlflow.db").exists(), names


def test_a_killed_store_makers_temp_store_is_removed_once_old(tmp_path):
    """A store maker killed before publishing leaves its temp store; the next train
    removes it once it is older than any store takes to build, and leaves a young one
    (another process may be building it) and the store itself."""
    import os
    import time

    from pipeline.io import TMP_PREFIX
    from pipeline.registry import STALE_STORE_SECONDS, init_sqlite_store, remove_stale_store_temps

    db = tmp_path / "mlflow" / "mlflow.db"
    init_sqlite_store(db)
    old = [db.with_name(f"{TMP_PREFIX}mlflow.db.{pid}") for pid in (41, 42)]
    old.append(old[1].with_name(old[1].name + "-journal"))
    young = db.with_name(f"{TMP_PREFIX}mlflow.db.43")
    for path in [*old, young]:
        path.write_bytes(b"half a store")
    long_ago = time.time() - STALE_STORE_SECONDS - 60
    for path in old:
        os.utime(path, (long_ago, long_ago))
    assert remove_stale_store_temps(db) == 3
    assert sorted(p.name for p in db.parent.iterdir() if p.is_file()) == sorted([db.name, young.name])
