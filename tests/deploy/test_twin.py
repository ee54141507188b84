"""What passes in compose must behave the same on the cluster: every pipeline
service of compose.yaml has its Job or Deployment in the chart, with the same
command, the same MLOPS_* variable names and the same image repository."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.chart import by_kind, render
from tests.deploy.test_compose_file import COMPOSE

TWINNED = ("ingest", "features", "feast", "train", "promote", "monitor", "serve", "mlflow")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())["services"]


@pytest.fixture(scope="module")
def chart():
    objects = render()
    containers = {}
    for obj in by_kind(objects, "Job") + by_kind(objects, "Deployment"):
        spec = obj["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            containers[c["name"]] = c
    config = by_kind(objects, "ConfigMap")[0]["data"]
    return containers, config


def env_names(container: dict, config: dict) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    if container.get("envFrom"):
        names |= set(config)
    return names - {"MLOPS_RUN_ID"}  # the chart's rollout id: compose orders stages by depends_on


def test_every_compose_service_has_a_twin_with_the_same_command(compose, chart):
    containers, _ = chart
    for service in TWINNED:
        assert service in containers, f"no Job or Deployment runs {service}"
        ours, theirs = compose[service]["command"], containers[service]["command"]
        # Kubernetes' command replaces the image's ENTRYPOINT, so the chart names it; compose keeps it
        assert theirs[0] == "/usr/local/bin/mlops-entrypoint", service
        theirs = theirs[1:]
        if service == "mlflow":  # same flags; --allowed-hosts names each runtime's own hosts
            strip = lambda cmd: [a for a in cmd if not a.startswith(("--allowed-hosts", "--port"))]
            assert strip(ours) == strip(theirs)
        else:
            assert ours == theirs == ["python", "-m", "pipeline", service]
    assert containers["init"]["command"][1:] == compose["init"]["command"]


def test_the_same_variable_names(compose, chart):
    containers, config = chart
    for service in ("ingest", "features", "feast", "train", "promote", "monitor", "serve"):
        ours = {k for k in compose[service]["environment"] if k.startswith(("MLOPS_", "MLFLOW_"))}
        assert ours == env_names(containers[service], config), service


def test_the_same_image_repository(compose, chart):
    containers, _ = chart
    compose_image = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", compose["serve"]["image"])
    repository = compose_image.rsplit(":", 1)[0]
    for service in TWINNED:
        assert containers[service]["image"].rsplit(":", 1)[0] == repository, service


def test_the_same_mount_point_and_user(compose, chart):
    containers, _ = chart
    objects = render()
    for service in TWINNED:
        assert {"name": "shared", "mountPath": "/shared"} in containers[service]["volumeMounts"]
        assert compose[service]["user"] == "10001:10001"
    for obj in by_kind(objects, "Job"):
        assert obj["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
