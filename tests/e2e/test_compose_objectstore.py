"""The lakehouse path and the disaster drill in the compose twin, as a user runs them
(docs/objectstore.md): the stack with ``compose.lakehouse.yaml`` (SeaweedFS first; raw
data's DVC remote, features, labels and MLflow's artifacts in its bucket), the pipeline,
serve (with the read-only ``serve`` identity); a snapshot with the one-shot ``backup``;
``docker compose down`` and the shared volume deleted (the object store's kept);
``restore`` (profile ``restore``) onto a new empty volume; serve again. The features must
be in the bucket and not on the volume; serve's keys must be refused a write; every entity
must get the same /predict answer before and after, the registry the same versions and
aliases, the same published version, ``dvc status`` must be clean in the volume and the
model version's lineage tags must name the restored raw data and the published features."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.parse
import urllib.request

import pytest

from pipeline.dag import IDEMPOTENT
from pipeline.synthetic import ENTITY_BASE, n_entities
from tests.e2e.test_compose import Compose, get
from tests.support import ROOT, docker_available, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

PROJECT = "mlops-e2e-objectstore"
ROWS, SEED = 500, 42  # 100 entities: small, so the drill is about the store, not the pipeline
UP = 1500  # seconds a whole `up --wait` may take on a busy machine (a few minutes on an idle one)
SECRETS = ROOT / ".secrets"
S3_FILES = ("s3_identities.json", "s3_backup_access_key", "s3_backup_secret_key", "s3_serve_access_key",
            "s3_serve_secret_key")
# the lakehouse: compose.yaml with its override, as docs/objectstore.md runs it
FILES = "compose.yaml:compose.lakehouse.yaml"
MODEL = "mlops-linear"
# What the volume and the bucket say, asked inside the running serve container (one exec,
# not a container per question): DVC's own status, the recorded raw hash, the published
# version and its features' md5 (what the lineage names), what of the lakehouse is in the
# bucket and what is (not) on the volume, the stages' last records; and, with serve's own
# keys, a list of the bucket and a write.
INSIDE = """
import hashlib, json, subprocess
from botocore.exceptions import ClientError
from pathlib import Path
from pipeline import lakehouse, versioning
from pipeline.dag import IDEMPOTENT
from pipeline.objectstore import client, credentials
from pipeline.settings import Settings
from pipeline.transfer import list_keys
settings, shared = Settings(), Path('/shared')
status = subprocess.run(['dvc', 'status'], cwd=shared, capture_output=True, text=True)
pointer, s3 = lakehouse.current(settings), client(settings)
count = lambda under: len(list_keys(s3, settings, 'lakehouse/' + under))
try:
    s3.put_object(Bucket=settings.s3_bucket, Key='lakehouse/forged.json', Body=b'{}')
    wrote = 'stored'
except ClientError as exc:
    wrote = exc.response['Error']['Code']
print(json.dumps({'dvc_status': status.stdout.strip(), 'dvc_rc': status.returncode,
                  'raw_dvc_hash': versioning.recorded_hash(shared),
                  'features_md5': lakehouse.table_md5(settings, 'features'), 'version': pointer['version'],
                  'bucket': {'features': count('features/' + pointer['version'] + '/'),
                             'labels': count('labels/' + pointer['version'] + '/'),
                             'mlflow': count('mlflow/'), 'dvc': count('dvc/')},
                  'on_volume': sorted(p for p in ('data/features/features.parquet', 'dvc-store',
                                                  'mlflow/server/artifacts') if (shared / p).exists()),
                  'records': {stage: json.loads((shared / 'runs' / stage / 'latest.json').read_text())
                              for stage in IDEMPOTENT},
                  'identity': {'write': wrote,
                               'access_key_sha256': hashlib.sha256(credentials(settings)[0].encode()).hexdigest()}}))
"""


def predict_all(serve: str) -> dict[int, tuple[float, int]]:
    """/predict for every entity the pipeline made, in one batch: id -> (prediction, model version)."""
    ids = list(range(ENTITY_BASE, ENTITY_BASE + n_entities(ROWS)))
    body = json.dumps({"instances": [{"customer_id": i} for i in ids]}).encode()
    request = urllib.request.Request(f"{serve}/predict", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer = json.loads(resp.read())
    version = answer["model"]["version"]
    return {p["customer_id"]: (p["prediction"], version) for p in answer["predictions"]}


def registry(mlflow: str) -> dict:
    """Every model version (run, source, tags) and the aliases, from the tracking server."""
    query = urllib.parse.quote(f"name='{MODEL}'")
    versions = json.loads(get(f"{mlflow}/api/2.0/mlflow/model-versions/search?filter={query}", auth=True)[1])
    model = json.loads(get(f"{mlflow}/api/2.0/mlflow/registered-models/get?name={MODEL}", auth=True)[1])
    return {"versions": {v["version"]: {"run_id": v["run_id"], "source": v["source"],
                                        "tags": {t["key"]: t["value"] for t in v.get("tags", [])}}
                         for v in versions["model_versions"]},
            "aliases": {a["alias"]: a["version"] for a in model["registered_model"].get("aliases", [])}}


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def volumes(project: str) -> set[str]:
    out = subprocess.run(["docker", "volume", "ls", "--quiet", "--filter", f"label=com.docker.compose.project={project}"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def drill():
    ok, reason = docker_available()
    if not ok:
        pytest.fail(reason)  # e2e runs only when asked for: a missing engine is an error
    missing = [name for name in S3_FILES if not (SECRETS / name).is_file()]
    if missing:
        pytest.fail(f"no object store secrets in .secrets/ ({', '.join(missing)}): run it through "
                    "`nox -s e2e_compose`, which writes them")
    ports = {"MLOPS_SERVE_PORT": str(free_port()), "MLOPS_MLFLOW_PORT": str(free_port())}
    env = {**os.environ, **ports, "MLOPS_ROWS": str(ROWS), "MLOPS_SEED": str(SEED), "COMPOSE_FILE": FILES}
    compose = Compose(env, project=PROJECT)
    every = ("--profile", "objectstore", "--profile", "restore", "--profile", "debug")
    serve, mlflow = (f"http://127.0.0.1:{ports[name]}" for name in ("MLOPS_SERVE_PORT", "MLOPS_MLFLOW_PORT"))
    compose(*every, "down", "--volumes", "--remove-orphans", check=False)
    seen: dict = {}
    try:
        # the lakehouse: the store first, then the pipeline and serve (docs/objectstore.md#lakehouse)
        compose("up", "--detach", "--pull", "never", "--wait", "serve", timeout=UP)
        seen["before"] = {"predict": predict_all(serve), "registry": registry(mlflow)}
        seen["lakehouse"] = last_json(compose("exec", "-T", "serve", "python", "-c", INSIDE))
        # a snapshot: the one-shot backup
        seen["backup"] = compose("--profile", "objectstore", "run", "--rm", "--no-deps", "backup")
        # the disaster (nox -s compose_down): everything down, the shared volume gone, the store's kept
        compose(*every, "down", "--remove-orphans")
        subprocess.run(["docker", "volume", "rm", f"{PROJECT}_shared"], check=True, capture_output=True)
        seen["volumes_after_disaster"] = volumes(PROJECT)
        # back: restore onto a new empty volume, then serve again
        seen["restore"] = compose("--profile", "restore", "run", "--rm", "restore")
        compose("up", "--detach", "--pull", "never", "--wait", "serve", timeout=UP)
        seen["after"] = {"predict": predict_all(serve), "registry": registry(mlflow)}
        seen["volume"] = last_json(compose("exec", "-T", "serve", "python", "-c", INSIDE))
        yield seen
    except BaseException:
        print(compose.failing_logs())
        raise
    finally:
        compose(*every, "down", "--volumes", "--remove-orphans", check=False)


def test_the_pipeline_kept_features_raw_data_and_artifacts_in_the_bucket_not_on_the_volume(drill):
    lake = drill["lakehouse"]
    # 500 rows over three months: one file per event month and table; DVC's remote and the model there
    assert lake["bucket"]["features"] == lake["bucket"]["labels"] == 3, lake
    assert lake["bucket"]["mlflow"] > 0 and lake["bucket"]["dvc"] > 0, lake
    assert lake["on_volume"] == [], lake
    assert len(drill["before"]["predict"]) == n_entities(ROWS)


def test_serve_has_the_read_only_identity_it_reads_the_bucket_and_cannot_write(drill):
    serve_key = hashlib.sha256((SECRETS / "s3_serve_access_key").read_text().strip().encode()).hexdigest()
    for when in ("lakehouse", "volume"):  # before the backup, and after the restore
        seen = drill[when]
        assert seen["bucket"]["features"] > 0, seen  # it listed the bucket with its keys ...
        assert seen["identity"]["write"] == "AccessDenied", seen["identity"]  # ... and could not write
        assert seen["identity"]["access_key_sha256"] == serve_key


def test_the_disaster_deleted_the_shared_volume_but_kept_the_backups(drill):
    assert f"{PROJECT}_shared" not in drill["volumes_after_disaster"]
    assert f"{PROJECT}_objectstore" in drill["volumes_after_disaster"]
    said = drill["backup"].stdout.strip().splitlines()[-1]
    assert said.startswith("snapshot "), drill["backup"].stdout[-2000:]
    snapshot = said.split()[1].rstrip(":")
    assert f"restored snapshot {snapshot}" in drill["restore"].stdout, drill["restore"].stdout[-2000:]


def test_predict_answers_exactly_as_before_for_every_entity(drill):
    before, after = drill["before"]["predict"], drill["after"]["predict"]
    assert len(before) == n_entities(ROWS)
    assert after == before


def test_the_registry_has_the_same_versions_and_aliases(drill):
    before, after = drill["before"]["registry"], drill["after"]["registry"]
    assert before["aliases"] == {"production": "1"}
    assert after == before


def test_the_restored_volume_is_clean_and_the_lineage_resolves(drill):
    volume = drill["volume"]
    assert volume["dvc_rc"] == 0 and "up to date" in volume["dvc_status"], volume
    # the lakehouse as the snapshot had it: the same published version, nothing moved onto the volume
    assert volume["version"] == drill["lakehouse"]["version"] and volume["on_volume"] == [], volume
    tags = drill["after"]["registry"]["versions"]["1"]["tags"]
    assert tags["mlops.raw_dvc_hash"] == volume["raw_dvc_hash"]
    assert tags["mlops.features_md5"] == volume["features_md5"]


def test_the_stages_after_restore_did_no_new_work(drill):
    records = drill["volume"]["records"]
    assert set(records) == set(IDEMPOTENT)
    for stage, record in records.items():
        assert record["status"] == "skipped", (stage, record.get("message"))


def test_no_key_shows_in_what_backup_and_restore_print(drill):
    keys = [(SECRETS / name).read_text().strip() for name in S3_FILES[1:]]
    for done in (drill["backup"], drill["restore"]):
        assert not any(key in done.stdout + done.stderr for key in keys)
