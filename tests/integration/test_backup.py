"""Backup and restore against a real SeaweedFS (``weed mini`` from the pinned
wheel, started on loopback ports like the Redis of the other tests): a lost
volume comes back with one command and answers exactly as before; a killed
backup leaves no snapshot that looks complete; the serve identity cannot write."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from werkzeug.test import Client

from pipeline import backup, transfer, versioning
from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES
from pipeline.dataset import CUSTOMERS as schema
from pipeline.io import file_md5, read_record
from pipeline.errors import ObjectStoreError
from pipeline.objectstore import client
from pipeline.serve import create_app
from tests.service.fakes import metrics_in_memory
from tests.support import ROOT, clean_env, make_settings, pipeline_cli, seaweedfs, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _metrics_in_memory(monkeypatch):
    metrics_in_memory(monkeypatch)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as running:
        yield running


@pytest.fixture(scope="module")
def volume(store, tmp_path_factory):
    """A pipeline run on its own volume, and the env of the backup identity."""
    shared = tmp_path_factory.mktemp("shared-backup") / "shared"
    env = store.env("backup")
    settings = make_settings(shared, s3_endpoint=env["MLOPS_S3_ENDPOINT"], s3_bucket=store.bucket,
                             s3_access_key_file=env["MLOPS_S3_ACCESS_KEY_FILE"],
                             s3_secret_key_file=env["MLOPS_S3_SECRET_KEY_FILE"], backup_keep=2)
    run_stages(settings, STAGE_NAMES)
    cli_env = clean_env(**env, MLOPS_SHARED_DIR=str(shared), MLOPS_BACKUP_KEEP="2",
                        MLOPS_LOCK_TIMEOUT_SECONDS="30")
    return settings, cli_env


def secrets_of(store, role: str) -> list[str]:
    return [path.read_text().strip() for path in store.key_files(role)]


def predictions(settings) -> dict:
    """/predict for every entity of the features, through the real app."""
    ids = sorted(pd.read_parquet(settings.features_path)[schema.join_key].unique().tolist())
    web = Client(create_app(settings, watch=False))
    out = {}
    for start in range(0, len(ids), 500):
        resp = web.post("/predict", json={"instances": [{schema.join_key: i} for i in ids[start:start + 500]]})
        assert resp.status_code == 200, resp.get_data()
        body = json.loads(resp.get_data())
        out.update({p[schema.join_key]: (p["prediction"], body["model"]["version"]) for p in body["predictions"]})
    return out


def registry(settings) -> dict:
    """Model versions (run, source, tags) and aliases, as MLflow reports them."""
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(settings.tracking_uri)
    versions = {v.version: (v.run_id, v.source, v.tags)
                for v in mlflow.search_model_versions(f"name = '{settings.model_name}'")}
    return {"versions": versions, "aliases": mlflow.get_registered_model(settings.model_name).aliases}


def test_backup_wipe_restore_answers_exactly_as_before(volume, store, tmp_path):
    settings, env = volume
    before, registered = predictions(settings), registry(settings)
    assert len(before) > 100

    made = pipeline_cli(["backup"], env)
    said = made.stdout.strip().splitlines()[-1]  # the result line, after the log lines
    assert said.startswith("snapshot "), made.stdout
    snapshot = said.split()[1].rstrip(":")
    listed = pipeline_cli(["backup", "--list", "-q"], env).stdout.splitlines()
    assert listed and listed[-1].startswith(snapshot)
    assert "ok: snapshot" in pipeline_cli(["backup", "--verify"], env).stdout
    again = pipeline_cli(["backup"], env)  # unchanged volume: a new snapshot, nothing sent
    assert "0 new object(s) to send; raw data: 0 DVC object(s) pushed" in again.stdout, again.stdout
    snapshot = again.stdout.strip().splitlines()[-1].split()[1].rstrip(":")

    shutil.rmtree(settings.shared)  # the disaster
    restored = pipeline_cli(["restore"], env)
    assert f"restored snapshot {snapshot}" in restored.stdout

    assert predictions(settings) == before
    assert registry(settings) == registered
    assert versioning.changed_files(settings.shared) == []  # `dvc status` is clean
    tags = registered["versions"][max(registered["versions"])][2]
    assert tags["mlops.raw_dvc_hash"] == versioning.recorded_hash(settings.shared)
    assert tags["mlops.features_md5"] == file_md5(settings.features_path)
    assert (settings.shared / "dvc-store").is_dir() and any((settings.shared / "dvc-store").rglob("*"))
    # the bucket's dvc/ is a DVC remote DVC itself reads: `dvc pull` into a bare repo gets the raw data
    bare = tmp_path / "bare"
    (bare / "data").mkdir(parents=True)
    shutil.copytree(settings.shared / ".dvc", bare / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copy(settings.shared / "data" / "raw.dvc", bare / "data" / "raw.dvc")
    assert transfer.dvc_transfer(bare, settings, "pull", "dvc") > 0
    assert versioning.changed_files(bare) == []
    for output in (made, restored):
        assert not any(secret in output.stdout + output.stderr for secret in secrets_of(store, "backup"))

    again = pipeline_cli(["restore"], env, check=False)  # never over a volume in use
    assert again.returncode == ObjectStoreError.exit_code
    assert again.stderr.startswith("error: restore needs an empty volume") and "Traceback" not in again.stderr


def test_a_killed_backup_leaves_no_complete_looking_snapshot(volume):
    settings, env = volume
    pipeline_cli(["backup"], env)
    s3 = client(settings)
    complete = backup.snapshot_ids(s3, settings)
    # Enough new content that sending it takes a while: the kill lands while objects go up.
    reports = settings.shared / "reports"
    reports.mkdir(exist_ok=True)
    for i in range(800):
        (reports / f"report-{i:03d}.bin").write_bytes(os.urandom(64 * 1024))
    stored_before = len(backup._list_keys(s3, settings, "objects/"))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "backup"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "new object(s) to send" in line:
                break
            assert time.monotonic() < deadline, "backup never started sending"
        # kill as soon as the first new object is in the store: mid-send, not after the manifest
        wait_until(lambda: len(backup._list_keys(s3, settings, "objects/")) > stored_before, 60,
                   "the backup's first new object", interval=0.01)
        proc.send_signal(signal.SIGKILL)
        objects_before_kill = len(backup._list_keys(s3, settings, "objects/")) - stored_before
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert backup.snapshot_ids(s3, settings) == complete  # nothing new looks complete
    assert [s["id"] for s in backup.list_snapshots(settings)] == complete

    # The next backup (the lock was dropped with the process) completes, and
    # retention (keep 2) removes the old snapshot and every object no kept snapshot names.
    pipeline_cli(["backup"], env)
    kept = backup.snapshot_ids(s3, settings)
    assert len(kept) == 2 and kept[0] == complete[-1]
    named = set()
    for snapshot in kept:
        named |= {f["sha256"] for f in backup.read_manifest(s3, settings, snapshot)["files"]}
    stored = {key.rsplit("/", 1)[-1] for key in backup._list_keys(s3, settings, "objects/")}
    assert stored == named and objects_before_kill > 0
    shutil.rmtree(reports)


def test_the_serve_identity_reads_but_cannot_write(volume, store):
    settings, _ = volume
    access, secret = store.key_files("serve")
    serve = settings.model_copy(update={"s3_access_key_file": access, "s3_secret_key_file": secret})
    s3 = client(serve)
    assert backup.snapshot_ids(s3, serve)  # reads the snapshots
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as denied:
        s3.put_object(Bucket=serve.s3_bucket, Key="snapshots/forged.json", Body=b"{}")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"

    env = clean_env(**store.env("serve"), MLOPS_SHARED_DIR=str(settings.shared))
    refused = pipeline_cli(["backup"], env, check=False)
    assert refused.returncode == ObjectStoreError.exit_code
    assert refused.stderr.startswith("error: ") and "refused the credentials" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not any(s in refused.stdout + refused.stderr for s in secrets_of(store, "serve"))
    assert read_record(settings.runs_dir, "promote") is not None  # the volume is untouched
