"""compose.yaml as a reviewer reads it: the volume contract, loopback-only ports,
the password from a secret, hardening, and a header that lists every variable."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from pipeline.dag import STAGE_NAMES as STAGES
from tests.conftest import ROOT

COMPOSE = ROOT / "compose.yaml"
PIPELINE_SERVICES = ("init", *STAGES, "serve", "mlflow")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the anchors and << merges


def test_every_pipeline_service_mounts_the_named_volume_at_shared(compose):
    assert "shared" in compose["volumes"]
    for name in PIPELINE_SERVICES:
        assert "shared:/shared" in compose["services"][name]["volumes"], name


def test_every_stage_runs_the_same_cli_as_the_simulator(compose):
    image = compose["services"]["serve"]["image"]
    for stage in ("init", *STAGES, "serve"):
        service = compose["services"][stage]
        assert service["command"] == ["python", "-m", "pipeline", stage]
        assert service["image"] == image


def test_stages_are_chained_on_successful_completion(compose):
    chain = ["init", *STAGES, "serve"]
    for upstream, stage in zip(chain, chain[1:]):
        assert compose["services"][stage]["depends_on"][upstream]["condition"] == \
            "service_completed_successfully", stage
    assert compose["services"]["serve"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_nothing_is_published_beyond_loopback_and_redis_not_at_all(compose):
    published = {name: s.get("ports", []) for name, s in compose["services"].items()}
    assert published["redis"] == []
    assert set(n for n, p in published.items() if p) == {"serve", "mlflow"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_redis_password_comes_from_a_secret_file_never_a_literal(compose):
    assert set(compose["secrets"]["redis_password"]) == {"file"}
    text = COMPOSE.read_text()
    assert "requirepass" in text and not re.search(r"requirepass\s+[\w-]{6,}", text)
    for name in ("redis", *PIPELINE_SERVICES):
        assert "redis_password" in compose["services"][name]["secrets"], name
    env = compose["services"]["feast"]["environment"]
    assert env["MLOPS_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
    assert "@" not in env["MLOPS_REDIS_URL"]


def test_long_running_services_have_healthchecks_and_everything_is_hardened(compose):
    for name in ("redis", "mlflow", "serve"):
        assert compose["services"][name]["healthcheck"]["test"], name
    for name in ("redis", *PIPELINE_SERVICES):
        s = compose["services"][name]
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in s["security_opt"], name
        assert not str(s["user"]).startswith("0"), name


def test_mlflow_answers_only_the_hosts_that_reach_it(compose):
    flags = [a for a in compose["services"]["mlflow"]["command"] if a.startswith("--allowed-hosts=")]
    assert flags and "*" != flags[0].split("=", 1)[1]
    assert "--serve-artifacts" in compose["services"]["mlflow"]["command"]


def test_the_header_lists_every_variable_the_file_uses():
    text = COMPOSE.read_text()
    header = text.split("name:", 1)[0]
    used = set(re.findall(r"\$\{(\w+)(?::-[^}]*)?\}", text))
    documented = set(re.findall(r"^#\s+(MLOPS_\w+)\s", header, re.M))
    assert used <= documented, used - documented


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_docker_compose_itself_accepts_the_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("x")
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(ROOT.home()),
                               "MLOPS_REDIS_PASSWORD_FILE": str(secret)})
    if "is not a docker command" in proc.stderr:
        pytest.skip("docker compose v2 plugin not installed")
    assert proc.returncode == 0, proc.stderr
    import json

    config = json.loads(proc.stdout)
    for name in PIPELINE_SERVICES:
        mounts = [(v["source"], v["target"]) for v in config["services"][name]["volumes"]]
        assert ("shared", "/shared") in mounts
    for service in config["services"].values():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1"


def test_mlflow_requires_a_login_from_secret_files(compose):
    mlflow = compose["services"]["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"] == "/run/secrets/mlflow_password"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"] == "/run/secrets/mlflow_secret_key"
    assert {"mlflow_password", "mlflow_secret_key"} <= set(mlflow["secrets"])
    for name in PIPELINE_SERVICES:
        service = compose["services"][name]
        assert service["environment"]["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"], name
        assert service["environment"]["MLFLOW_TRACKING_PASSWORD_FILE"] == "/run/secrets/mlflow_password", name
        assert "mlflow_password" in service["secrets"], name
    assert set(compose["secrets"]["mlflow_password"]) == {"file"}


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
@pytest.mark.parametrize("folder", [None, "given"])
def test_a_dataset_folder_is_mounted_read_only_and_named_by_mlops_dataset(tmp_path, folder):
    import json

    secret = tmp_path / "pw"
    secret.write_text("x")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(ROOT.home()), "MLOPS_REDIS_PASSWORD_FILE": str(secret),
           "MLOPS_MLFLOW_PASSWORD_FILE": str(secret), "MLOPS_MLFLOW_SECRET_KEY_FILE": str(secret)}
    if folder:
        (tmp_path / folder).mkdir()
        env.update(MLOPS_DATASET_DIR=str(tmp_path / folder), MLOPS_DATASET_FILE="housing.yaml")
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    if "is not a docker command" in proc.stderr:
        pytest.skip("docker compose v2 plugin not installed")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    for name in PIPELINE_SERVICES:
        service = config["services"][name]
        mount = next(v for v in service["volumes"] if v["target"] == "/dataset")
        assert mount["read_only"] is True, name
        if folder:
            assert (mount["type"], mount["source"]) == ("bind", str(tmp_path / folder)), name
            assert service["environment"]["MLOPS_DATASET"] == "/dataset/housing.yaml", name
        else:  # unset: an empty volume and no declaration, the built-in customers
            assert mount["type"] == "volume", name
            assert not service["environment"]["MLOPS_DATASET"], name
