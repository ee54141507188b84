"""Backup and restore with the lakehouse on, against a real SeaweedFS: the features,
labels and MLflow's artifacts are in the bucket, not on the volume, so a snapshot names
copies of them. After the lakehouse moved on (two publishes pruned the snapshot's
version), its MLflow artifacts were lost and the volume wiped, ``restore`` brings back
the volume, the published version, the artifacts and the online store: every entity
gets the same answer, from the same model versions and aliases, and the stages skip."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from pyarrow.fs import FileSelector
from werkzeug.test import Client

from pipeline import backup, lakehouse, transfer, versioning
from pipeline.cli import run_stages
from pipeline.dag import IDEMPOTENT, STAGE_NAMES
from pipeline.dataset import CUSTOMERS as schema
from pipeline.errors import ObjectStoreError
from pipeline.io import read_record
from pipeline.objectstore import client
from pipeline.serve import create_app
from pipeline.synthetic import n_entities
from tests.service.fakes import metrics_in_memory
from tests.support import clean_env, make_settings, pipeline_cli, seaweedfs

pytestmark = pytest.mark.integration

PREFIX = "team-b/"


@pytest.fixture(autouse=True)
def _metrics_in_memory(monkeypatch):
    metrics_in_memory(monkeypatch)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs-lakehouse-backup")) as running:
        yield running


def cli_env(settings, **extra: str) -> dict[str, str]:
    """``python -m pipeline`` as a user runs it on ``settings``: key files, no AWS_* variable."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    env.update(MLOPS_SHARED_DIR=str(settings.shared), MLOPS_LOCK_TIMEOUT_SECONDS="30",
               MLOPS_S3_ENDPOINT=settings.s3_endpoint, MLOPS_S3_BUCKET=settings.s3_bucket,
               MLOPS_S3_PREFIX=settings.s3_prefix, MLOPS_S3_ACCESS_KEY_FILE=str(settings.s3_access_key_file),
               MLOPS_S3_SECRET_KEY_FILE=str(settings.s3_secret_key_file), MLOPS_LAKEHOUSE="true")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def lake(store, tmp_path_factory):
    """Every stage with the lakehouse on (the backup identity), and the serve identity's settings."""
    env = store.env("backup")
    settings = make_settings(tmp_path_factory.mktemp("lake-backup") / "shared", rows=2000, lakehouse=True,
                             s3_endpoint=env["MLOPS_S3_ENDPOINT"], s3_bucket=store.bucket, s3_prefix=PREFIX,
                             s3_access_key_file=env["MLOPS_S3_ACCESS_KEY_FILE"],
                             s3_secret_key_file=env["MLOPS_S3_SECRET_KEY_FILE"])
    run_stages(settings, STAGE_NAMES)
    access, secret = store.key_files("serve")
    return settings, settings.model_copy(update={"s3_access_key_file": access, "s3_secret_key_file": secret})


def predictions(settings) -> dict:
    """/predict for every entity of the published features, through the real app."""
    keys = lakehouse.dataset(settings, "features").to_table(columns=[schema.join_key]).column(0)
    ids = sorted(set(keys.to_pylist()))
    with lakehouse.s3_environment(settings):  # the model's artifacts are read from the store
        web = Client(create_app(settings, watch=False))
        resp = web.post("/predict", json={"instances": [{schema.join_key: i} for i in ids]})
    assert resp.status_code == 200, resp.get_data()
    body = json.loads(resp.get_data())
    return {p[schema.join_key]: (p["prediction"], body["model"]["version"]) for p in body["predictions"]}


def registry(settings) -> dict:
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(settings.tracking_uri)
    versions = {v.version: (v.run_id, v.source, v.tags)
                for v in mlflow.search_model_versions(f"name = '{settings.model_name}'")}
    return {"versions": versions, "aliases": mlflow.get_registered_model(settings.model_name).aliases}


def lake_keys(settings, under: str) -> list[str]:
    fs = lakehouse.filesystem(settings)
    found = fs.get_file_info(FileSelector(f"{lakehouse.root(settings)}/{under}", recursive=True,
                                          allow_not_found=True))
    return [i.path for i in found if i.type.name == "File"]


def test_a_lakehouse_snapshot_brings_back_volume_features_artifacts_and_answers(lake, store):
    settings, serve = lake
    before, registered, pointer = predictions(serve), registry(settings), lakehouse.current(settings)
    assert len(before) == n_entities(settings.rows) and not settings.features_path.exists()
    env = cli_env(settings)

    made = pipeline_cli(["backup"], env)
    snapshot = made.stdout.strip().splitlines()[-1].split()[1].rstrip(":")
    manifest = backup.read_manifest(client(settings), settings, snapshot)
    held = {f["key"].split("/")[0] for f in manifest["lakehouse"]["files"]}
    assert manifest["lakehouse"]["pointer"] == pointer and held == {"features", "labels", "mlflow"}
    assert "ok: snapshot" in pipeline_cli(["backup", "--verify"], env).stdout
    again = pipeline_cli(["backup"], env)  # nothing changed: nothing sent, nothing copied
    assert "0 new object(s) to send" in again.stdout and "0 new object(s) copied" in again.stdout, again.stdout
    snapshot = again.stdout.strip().splitlines()[-1].split()[1].rstrip(":")

    # The lakehouse moves on: two publishes, and the snapshot's version is pruned ...
    for seed in (8, 9):
        run_stages(settings.model_copy(update={"seed": seed}), ("ingest", "features"))
    assert lakehouse.current(settings)["version"] != pointer["version"]
    assert not lake_keys(settings, f"features/{pointer['version']}")
    # ... then the disaster: the volume and the model's artifacts in the bucket are lost
    fs = lakehouse.filesystem(settings)
    fs.delete_dir(f"{lakehouse.root(settings)}/mlflow")
    shutil.rmtree(settings.shared)

    restored = pipeline_cli(["restore"], env)
    assert f"restored snapshot {snapshot}" in restored.stdout, restored.stdout

    assert lakehouse.current(settings) == pointer  # the snapshot's version is published again
    assert lake_keys(settings, f"features/{pointer['version']}") and lake_keys(settings, "mlflow")
    assert predictions(serve) == before  # online store, model from the bucket, read-only identity
    assert registry(settings) == registered
    assert versioning.changed_files(settings.shared) == []  # `dvc status` is clean
    tags = registered["versions"][max(registered["versions"])][2]
    assert tags["mlops.raw_dvc_hash"] == versioning.recorded_hash(settings.shared)
    assert tags["mlops.features_md5"] == lakehouse.table_md5(settings, "features")
    assert not settings.features_path.exists() and not (settings.shared / "dvc-store").exists()
    run_stages(settings, STAGE_NAMES)  # nothing to do: no new publish, no new model version
    for stage in IDEMPOTENT:
        assert read_record(settings.runs_dir, stage).status == "skipped", stage
    assert lakehouse.current(settings) == pointer and registry(settings) == registered
    keys = [path.read_text().strip() for role in ("backup", "serve") for path in store.key_files(role)]
    for output in (made, again, restored):
        assert not any(key in output.stdout + output.stderr for key in keys)


def test_a_lakehouse_snapshot_is_not_restored_with_the_lakehouse_off(lake, tmp_path):
    settings, _ = lake
    if not backup.snapshot_ids(client(settings), settings):  # when run on its own
        pipeline_cli(["backup"], cli_env(settings))
    refused = pipeline_cli(["restore"], cli_env(settings, MLOPS_SHARED_DIR=str(tmp_path), MLOPS_LAKEHOUSE="false"),
                           check=False)
    assert refused.returncode == ObjectStoreError.exit_code
    assert refused.stderr.startswith("error: ") and "MLOPS_LAKEHOUSE=true" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


@pytest.fixture
def bare(store, tmp_path, request):
    """The backup identity's settings under a prefix of this test's own, nothing published."""
    env = store.env("backup")
    settings = make_settings(tmp_path / "shared", lakehouse=True, s3_endpoint=env["MLOPS_S3_ENDPOINT"],
                             s3_bucket=store.bucket, s3_prefix=f"{request.node.name[:40]}/",
                             s3_access_key_file=env["MLOPS_S3_ACCESS_KEY_FILE"],
                             s3_secret_key_file=env["MLOPS_S3_SECRET_KEY_FILE"])
    return settings, client(settings)


def test_large_objects_are_copied_in_parts_and_a_restored_copy_is_not_read_or_copied_again(bare, monkeypatch):
    settings, s3 = bare
    # S3's smallest part: the 6 MiB artifact goes in two parts, as one over 256 MiB does
    monkeypatch.setattr(transfer, "COPY_CONFIG", {"multipart_threshold": 5 << 20, "multipart_chunksize": 5 << 20})
    body, where = os.urandom(6 << 20), transfer.key(settings, "lakehouse", "mlflow/1/abc/artifacts/model.pkl")
    s3.put_object(Bucket=settings.s3_bucket, Key=where, Body=body)
    section, copied = transfer.lakehouse_snapshot(s3, settings, None, set())
    (entry,) = section["files"]
    assert copied == 1 and entry["sha256"] == hashlib.sha256(body).hexdigest()
    copy = s3.get_object(Bucket=settings.s3_bucket, Key=transfer.key(settings, "objects", entry["sha256"]))
    assert copy["ETag"].strip('"').endswith("-2") and copy["Body"].read() == body

    s3.delete_object(Bucket=settings.s3_bucket, Key=where)  # the artifact is lost
    assert transfer.lakehouse_restore(s3, settings, section) == 1
    back = s3.get_object(Bucket=settings.s3_bucket, Key=where)
    assert back["Body"].read() == body and back["ETag"].strip('"') != entry["etag"]  # a new ETag

    # ... yet the next restore and backup know it by the sha256 the restore marked it with
    monkeypatch.setattr(transfer, "_sha256_of", lambda *args: pytest.fail(f"read again: {args[-1]}"))
    assert transfer.lakehouse_restore(s3, settings, section) == 0
    again, copied = transfer.lakehouse_snapshot(s3, settings, section, {entry["sha256"]})
    assert copied == 0 and [f["sha256"] for f in again["files"]] == [entry["sha256"]]
    # and a copy that differs from the snapshot's is copied back, mark or not
    s3.put_object(Bucket=settings.s3_bucket, Key=where, Body=body[::-1])
    assert transfer.lakehouse_restore(s3, settings, section) == 1
    assert s3.get_object(Bucket=settings.s3_bucket, Key=where)["Body"].read() == body


def test_a_snapshot_taken_before_any_publish_restores_no_published_version(bare):
    settings, s3 = bare
    section, _ = transfer.lakehouse_snapshot(s3, settings, None, set())
    assert section == {"pointer": None, "files": []}
    later = {"version": "20270101T000000Z", "tables": {}}  # a publish after the snapshot
    s3.put_object(Bucket=settings.s3_bucket, Key=transfer.key(settings, "lakehouse", "current.json"),
                  Body=json.dumps(later).encode())
    assert transfer.lakehouse_pointer(s3, settings) == later
    transfer.lakehouse_restore(s3, settings, section)
    assert transfer.lakehouse_pointer(s3, settings) is None  # not the later version with the old volume
