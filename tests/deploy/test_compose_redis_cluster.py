"""compose.redis-cluster.yaml, merged over compose.yaml by `docker compose` itself: six
cluster nodes from compose's Redis image, a one-shot init the online store's users wait
for, and every pipeline service pointed at the cluster."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from pipeline.settings import known_variables
from tests.conftest import ROOT

OVERRIDE = ROOT / "compose.redis-cluster.yaml"
NODES = ("redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6")


def compose_config(*files: str, tmp_path) -> dict:
    """`docker compose ... config` of the files, every profile on."""
    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed")
    secret = tmp_path / "pw"
    secret.write_text("x")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(ROOT.home())}
    env.update({name: str(secret) for name in ("MLOPS_REDIS_PASSWORD_FILE", "MLOPS_MLFLOW_PASSWORD_FILE",
                                               "MLOPS_MLFLOW_SECRET_KEY_FILE")})
    argv = ["docker", "compose", *(arg for f in files for arg in ("-f", f)), "--profile", "*",
            "config", "--format", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    if "is not a docker command" in proc.stderr:
        pytest.skip("docker compose v2 plugin not installed")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict:
    return compose_config("compose.yaml", "compose.redis-cluster.yaml", tmp_path=tmp_path_factory.mktemp("c"))


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict:
    return compose_config("compose.yaml", tmp_path=tmp_path_factory.mktemp("a"))


def test_every_service_that_reaches_redis_is_pointed_at_a_cluster_node(merged, alone):
    users = {name for name, s in alone["services"].items() if "MLOPS_REDIS_URL" in (s.get("environment") or {})}
    assert {"feast", "serve"} <= users
    for name in users:
        env = merged["services"][name]["environment"]
        assert env["MLOPS_REDIS_CLUSTER"] == "true", name  # a service added to compose.yaml, left out here
        host = env["MLOPS_REDIS_URL"].split("//", 1)[1].split(":", 1)[0]
        assert host in NODES, (name, env["MLOPS_REDIS_URL"])
    overridden = yaml.safe_load(OVERRIDE.read_text())["services"]
    set_here = {key for s in overridden.values() for key in (s.get("environment") or {}) if key.startswith("MLOPS_")}
    assert set_here <= known_variables(), set_here - known_variables()


def test_six_hardened_cluster_nodes_from_composes_redis_image(merged, alone):
    image = alone["services"]["redis"]["image"]
    for name in NODES:
        node = merged["services"][name]
        script = " ".join(node["command"])
        assert node["image"] == image, name
        assert "cluster-enabled yes" in script and "appendonly yes" in script, name
        assert "cluster-announce-hostname" in script and node["environment"]["NODE"] == name
        assert "/run/secrets/redis_password" in script and "redis_password" in {s["source"] for s in node["secrets"]}
        assert node["user"] == "65534:65534" and node["read_only"] is True, name
        assert node["cap_drop"] == ["ALL"] and node["security_opt"] == ["no-new-privileges:true"], name
        assert not node.get("ports"), name  # reachable on the backend network only
        assert node["healthcheck"]["test"][0] == "CMD-SHELL", name


def test_the_cluster_is_formed_before_anything_reads_or_writes_it(merged):
    init = merged["services"]["redis-cluster-init"]
    script = " ".join(init["command"])
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert {name: dep["condition"] for name, dep in init["depends_on"].items()} == \
        {name: "service_healthy" for name in NODES}
    for name in ("feast", "serve", "retrain"):
        assert merged["services"][name]["depends_on"]["redis-cluster-init"]["condition"] == \
            "service_completed_successfully", name


def test_the_header_says_how_to_use_it():
    header = OVERRIDE.read_text().split("\nx-", 1)[0]
    assert "docker compose -f compose.yaml -f compose.redis-cluster.yaml up" in header
    assert "MLOPS_REDIS_CLUSTER=true" in header
