"""compose.lakehouse.yaml, the lakehouse in the compose twin, as docker compose merges it
with compose.yaml: every pipeline command gets the lakehouse, the store's endpoint and its
keys as secret files; SeaweedFS starts without a profile, healthy before ``init`` and the
tracking server, which keeps its artifacts in the bucket under ``lakehouse/mlflow``; without
the file nothing changes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from pipeline.settings import known_variables
from tests.support import ROOT

PROFILES = ("objectstore", "restore", "monitoring", "debug")
# every container that runs `python -m pipeline <command>` on the shared volume
COMMANDS = ("init", "ingest", "features", "feast", "train", "promote", "monitor", "serve", "retrain",
            "backup", "restore", "shell")


def config(*files: str, profiles: tuple[str, ...] = PROFILES) -> dict:
    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed")
    argv = ["docker", "compose"] + [a for f in files for a in ("-f", str(ROOT / f))]
    argv += [a for p in profiles for a in ("--profile", p)] + ["config", "--format", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(ROOT.home())})
    if "is not a docker command" in proc.stderr:
        pytest.skip("docker compose v2 plugin not installed")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["services"]


@pytest.fixture(scope="module")
def lake():
    return config("compose.yaml", "compose.lakehouse.yaml")


def mounted(service: dict) -> dict[str, str]:
    """secret file path in the container -> the secret's name."""
    return {s.get("target") or f"/run/secrets/{s['source']}": s["source"] for s in service["secrets"]}


def test_every_pipeline_command_gets_the_lakehouse_and_the_keys_as_files(lake):
    for name in COMMANDS:
        env, secrets = lake[name]["environment"], mounted(lake[name])
        assert env["MLOPS_LAKEHOUSE"] == "true", name
        assert env["MLOPS_S3_ENDPOINT"] == "http://seaweedfs:8333" and env["MLOPS_S3_BUCKET"] == "mlops", name
        assert secrets[env["MLOPS_S3_ACCESS_KEY_FILE"]] == "s3_access_key", name
        assert secrets[env["MLOPS_S3_SECRET_KEY_FILE"]] == "s3_secret_key", name
        assert not [k for k in env if k.startswith("AWS_")], name  # the stages read the files themselves
        assert {k for k in env if k.startswith("MLOPS_")} <= known_variables(), name
    # the bucket is the one SeaweedFS makes, and its gateway is the endpoint
    assert "-bucket=mlops" in lake["seaweedfs"]["command"] and "8333" in lake["seaweedfs"]["expose"]


def test_the_store_starts_first_without_a_profile():
    plain = config("compose.yaml", "compose.lakehouse.yaml", profiles=())
    assert "seaweedfs" in plain and "backup" not in plain  # the store, not the backup
    for name in ("init", "mlflow"):
        assert plain[name]["depends_on"]["seaweedfs"]["condition"] == "service_healthy", name
    # every stage runs after init, so after the store
    assert plain["ingest"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_the_tracking_server_keeps_artifacts_in_the_bucket(lake):
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["mlflow"]["command"]
    server = lake["mlflow"]
    assert "--artifacts-destination=s3://mlops/lakehouse/mlflow" in server["command"]
    # the rest of compose.yaml's command, unchanged
    strip = lambda cmd: [a for a in cmd if not a.startswith("--artifacts-destination")]
    assert strip(server["command"]) == strip(base) and "--serve-artifacts" in server["command"]
    env, secrets = server["environment"], mounted(server)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == lake["features"]["environment"]["MLOPS_S3_ENDPOINT"]
    # the image's entrypoint sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from these files
    assert secrets[env["AWS_ACCESS_KEY_ID_FILE"]] == "s3_access_key"
    assert secrets[env["AWS_SECRET_ACCESS_KEY_FILE"]] == "s3_secret_key"
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do" in dockerfile


def test_without_the_file_the_stages_stay_on_the_volume():
    plain = config("compose.yaml")
    for name in COMMANDS:
        if name in plain:
            assert plain[name]["environment"]["MLOPS_LAKEHOUSE"] == "false", name
    assert "--artifacts-destination=/shared/mlflow/server/artifacts" in plain["mlflow"]["command"]
    assert "seaweedfs" not in config("compose.yaml", profiles=())  # the object store stays a profile
