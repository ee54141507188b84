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
    by_default = {n for n, p in published.items() if p and not compose["services"][n].get("profiles")}
    assert by_default == {"serve", "mlflow"}
    # the monitoring profile's UIs; the exporter, the retrain webhook and S3 stay internal
    assert {n for n, p in published.items() if p} - by_default == {"prometheus", "alertmanager"}
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


# The optional profiles: off by default, so `docker compose up` and the e2e run what they did.

PROFILED = {"monitor-exporter": "monitoring", "prometheus": "monitoring", "alertmanager": "monitoring",
            "retrain": "monitoring", "seaweedfs": "objectstore", "backup": "objectstore", "restore": "restore"}


def test_the_monitoring_and_objectstore_services_are_under_profiles(compose):
    services = compose["services"]
    for name, profile in PROFILED.items():
        assert profile in services[name].get("profiles", []), name
    unprofiled = {n for n, s in services.items() if not s.get("profiles")}
    assert unprofiled == {"init", "redis", "mlflow", *STAGES, "serve"}
    for name in PROFILED:
        s = services[name]
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in s["security_opt"] and not str(s["user"]).startswith("0"), name
        if s.get("restart") == "unless-stopped":
            assert s["healthcheck"]["test"], name


def test_the_monitoring_profile_runs_what_monitoring_expects(compose):
    services = compose["services"]
    exporter = services["monitor-exporter"]
    assert exporter["command"] == ["python", "-m", "pipeline.monitor_exporter", "--port", "9108"]
    assert exporter["volumes"][0] == "shared:/shared:ro" and exporter["expose"] == ["9108"]
    assert not exporter["secrets"]  # it reads one report: no Redis, no MLflow
    assert services["retrain"]["command"] == ["python", "-m", "pipeline", "retrain", "--webhook", "9095"]
    # monitoring/: what Prometheus scrapes and where Alertmanager sends retrain alerts are these services
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    targets |= {t for a in scrape["alerting"]["alertmanagers"] for c in a["static_configs"] for t in c["targets"]}
    for target in targets:
        host, port = target.split(":")
        assert port in [str(p) for p in services[host]["expose"]], target
    alertmanager = yaml.safe_load((ROOT / "monitoring" / "alertmanager" / "alertmanager.yml").read_text())
    urls = [w["url"] for r in alertmanager["receivers"] for w in r.get("webhook_configs", [])]
    assert urls == ["http://retrain:9095/alerts"]
    for name, folder in (("prometheus", "prometheus"), ("alertmanager", "alertmanager")):
        assert f"./monitoring/{folder}:/etc/{folder}:ro" in services[name]["volumes"], name
        assert re.fullmatch(r"\$\{MLOPS_%s_IMAGE:-prom/%s:v[\d.]+\}" % (name.upper(), name),
                            services[name]["image"]), name


def test_the_objectstore_profile_backs_up_with_key_files_the_settings_know(compose):
    services = compose["services"]
    store = services["seaweedfs"]
    assert store["command"][:2] == ["weed", "mini"] and "-s3.config=/run/secrets/s3_identities" in store["command"]
    assert store["volumes"] == ["objectstore:/shared"] and "objectstore" in compose["volumes"]
    assert store["secrets"] == ["s3_identities"] and not store.get("ports")
    for name in ("backup", "restore"):
        service = services[name]
        assert service["command"] == ["python", "-m", "pipeline", name]
        env = service["environment"]
        assert env["MLOPS_S3_ENDPOINT"] == "http://seaweedfs:8333"
        assert "-bucket=" + env["MLOPS_S3_BUCKET"] in store["command"]
        for key in ("access_key", "secret_key"):
            assert env[f"MLOPS_S3_{key.upper()}_FILE"] == f"/run/secrets/s3_{key}", name
            assert f"s3_{key}" in service["secrets"], name
        assert service["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert "init" not in services["restore"].get("depends_on", {})  # restore wants an empty volume
    for secret in ("s3_identities", "s3_access_key", "s3_secret_key"):
        assert set(compose["secrets"][secret]) == {"file"}, secret


def test_noxfiles_seaweedfs_identities_are_the_object_stores():
    """noxfile.py writes compose's identities without importing the pipeline (nox runs
    without its dependencies): the roles and rights must be pipeline/objectstore.py's."""
    import ast
    import json
    import secrets

    from pipeline.objectstore import identities

    tree = ast.parse((ROOT / "noxfile.py").read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "s3_identities")
    function.returns = None
    namespace = {"secrets": secrets, "json": json}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "noxfile.py", "exec"), namespace)
    ours, keys = namespace["s3_identities"]("mlops")
    theirs, _ = identities("mlops")
    rights = lambda doc: {i["name"]: i["actions"] for i in doc["identities"]}
    assert rights(ours) == rights(theirs)
    assert {i["name"]: (i["credentials"][0]["accessKey"], i["credentials"][0]["secretKey"])
            for i in ours["identities"]} == keys
