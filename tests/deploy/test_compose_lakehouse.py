"""compose.lakehouse.yaml, the lakehouse in the compose twin, as docker compose merges it
with compose.yaml: every pipeline command gets the lakehouse, the store's endpoint and its
keys as secret files (serve and the monitor, which only read the bucket, the read-only
``serve`` identity's; the others the ``backup`` identity's); SeaweedFS starts without a profile, healthy before ``init`` and the
tracking server, which keeps its artifacts in the bucket under ``lakehouse/mlflow``; without
the file nothing changes."""

from __future__ import annotations

import ast
import json
import secrets
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
READ_ONLY = ("serve", "monitor")  # they read the bucket, never write it


def rendered(*files: str, profiles: tuple[str, ...] = PROFILES) -> dict:
    """``docker compose config`` of ``files`` as JSON: services, secrets, volumes."""


    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed")
    argv = ["docker", "compose"] + [a for f in files for a in ("-f", str(ROOT / f))]
    argv += [a for p in profiles for a in ("--profile", p)] + ["config", "--format", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(ROOT.home())})
    if "is not a docker command" in proc.stderr:
        pytest.skip("docker compose v2 plugin not installed")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def config(*files: str, profiles: tuple[str, ...] = PROFILES) -> dict:
    return rendered(*files, profiles=profiles)["services"]


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
        identity = "s3_serve_" if name in READ_ONLY else "s3_"
        assert secrets[env["MLOPS_S3_ACCESS_KEY_FILE"]] == f"{identity}access_key", name
        assert secrets[env["MLOPS_S3_SECRET_KEY_FILE"]] == f"{identity}secret_key", name
        assert not [k for k in env if k.startswith("AWS_")], name  # the stages read the files themselves
        assert {k for k in env if k.startswith("MLOPS_")} <= known_variables(), name
    # the bucket is the one SeaweedFS makes, and its gateway is the endpoint
    assert "-bucket=mlops" in lake["seaweedfs"]["command"] and "8333" in lake["seaweedfs"]["expose"]


def test_serve_and_the_monitor_get_the_read_only_identity_and_no_key_that_writes():
    """The secrets serve and the monitor mount are the files nox writes for the `serve` role,
    which SeaweedFS lets read and list only; the backup identity's keys are not mounted."""
    doc = rendered("compose.yaml", "compose.lakehouse.yaml")
    files = {name: secret["file"] for name, secret in doc["secrets"].items()}
    for name in READ_ONLY:
        mounts = set(mounted(doc["services"][name]).values())
        assert {"s3_serve_access_key", "s3_serve_secret_key"} <= mounts, name
        assert not mounts & {"s3_access_key", "s3_secret_key"}, name
    for key in ("access_key", "secret_key"):
        assert files[f"s3_serve_{key}"] == str(ROOT / ".secrets" / f"s3_serve_{key}")
        assert files[f"s3_{key}"] == str(ROOT / ".secrets" / f"s3_backup_{key}")
    # nox writes s3_<role>_<key> for every role of the identities SeaweedFS loads; serve's may not write
    nox = (ROOT / "noxfile.py").read_text()
    assert 'files[f"s3_{role}_access_key"], files[f"s3_{role}_secret_key"] = access, secret' in nox
    function = next(n for n in ast.parse(nox).body if isinstance(n, ast.FunctionDef) and n.name == "s3_identities")
    function.returns = None
    namespace = {"secrets": secrets}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "noxfile.py", "exec"), namespace)
    rights = {i["name"]: i["actions"] for i in namespace["s3_identities"]("mlops")[0]["identities"]}
    assert rights["serve"] == ["Read:mlops", "List:mlops"] and "Write:mlops" in rights["backup"]


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
