"""The Helm chart, checked offline: rendered by the real Helm engine, valid against
the Kubernetes schemas, Pod Security "restricted", and ordered so that upgrades and
Argo CD syncs work (no random names, no patched Job templates)."""

from __future__ import annotations

import json

import pytest

from pipeline.dag import STAGE_NAMES as STAGES
from tests.deploy.chart import CHART, SCHEMAS, by_kind, pod_specs, render, values_file

from tests.support import load_script

HOSTPATH = values_file("values-minikube.yaml")
EVERYTHING = load_script("render_chart").EVERYTHING  # the set `nox -s helm_check` validates too


@pytest.fixture(scope="module")
def default():
    return render()


@pytest.fixture(scope="module")
def hostpath():
    return render(values=HOSTPATH)


def test_helm_lint_is_clean():
    import helm_python as helm

    for values in ({}, HOSTPATH, EVERYTHING):
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("values, count", [({}, 17), (HOSTPATH, 16), (EVERYTHING, 25)],
                         ids=["default", "hostPath", "everything"])
def test_every_object_is_valid_kubernetes(values, count):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    objects = render(values=values)
    # configmap, 2 secrets (redis, mlflow), the shared pvc (not with hostPath), redis's pvc,
    # 3 deployments, 3 services, 6 jobs; with everything on: a ServiceMonitor, 4 NetworkPolicies,
    # the data set's ConfigMap, a HorizontalPodAutoscaler and a PodDisruptionBudget
    assert len(objects) == count
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: checked against its own schema below
        kubernetes_validate.validate(obj, version, strict=True)


def test_servicemonitor_is_valid_against_its_crd_schema():
    import jsonschema

    monitors = by_kind(render(values=EVERYTHING), "ServiceMonitor")
    assert len(monitors) == 1
    schema = json.loads((SCHEMAS / "monitoring.coreos.com" / "servicemonitor_v1.json").read_text())
    jsonschema.validate(monitors[0], schema)
    assert monitors[0]["spec"]["endpoints"][0]["path"] == "/metrics"


def test_default_install_has_a_pvc_and_hostpath_switches_to_the_node_folder(default, hostpath):
    claims = lambda objs: sorted(p["metadata"]["name"] for p in by_kind(objs, "PersistentVolumeClaim"))
    assert claims(default) == ["mlops-shared-volume-redis", "mlops-shared-volume-shared"]
    assert claims(hostpath) == ["mlops-shared-volume-redis"]  # Redis's append-only file keeps its own
    mounting = [(name, spec) for name, spec in pod_specs(hostpath)
                if any(v["name"] == "shared" for v in spec["volumes"])]
    assert len(mounting) == 8  # every pod but redis
    for name, spec in mounting:
        shared = next(v for v in spec["volumes"] if v["name"] == "shared")
        assert shared["hostPath"]["path"] == "/tmp/mlops-shared", name
        # never DirectoryOrCreate: a created folder is root's, and pods (uid 10001) could not write it
        assert shared["hostPath"]["type"] == "Directory", name


def test_every_pod_meets_the_restricted_profile(default):
    specs = pod_specs(default)
    assert len(specs) == 9  # 6 stage Jobs, serve, redis, mlflow
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert all("hostPath" not in v for v in spec["volumes"]), name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, (name, c["name"])
            assert set(c["resources"]) == {"requests", "limits"}, (name, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (name, c["name"])
            assert not c["image"].endswith(":latest") and ":" in c["image"], (name, c["image"])


def test_probes_on_the_server(default):
    serve = next(d for d in by_kind(default, "Deployment") if d["metadata"]["name"].endswith("-serve"))
    container = serve["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_jobs_keep_their_names_until_their_spec_changes():
    jobs = lambda objs: sorted(j["metadata"]["name"] for j in by_kind(objs, "Job"))
    first, again = jobs(render()), jobs(render())
    assert first == again  # nothing random: an Argo CD re-sync changes nothing
    assert [n.rsplit("-", 1)[0] for n in first] == sorted(f"mlops-shared-volume-{s}" for s in STAGES)
    more_rows = jobs(render(values={"pipeline": {"rows": 20000}}))
    assert set(more_rows).isdisjoint(first)  # new settings: new Jobs, never a patched template
    more_memory = jobs(render(values={"jobs": {"train": {"resources": {
        "requests": {"cpu": "200m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}}}}}))
    changed = set(more_memory) - set(first)
    assert len(changed) == 1 and "-train-" in changed.pop()
    assert all(len(n) <= 63 for n in first)


def test_stages_run_in_order_under_argo_cd_and_wait_for_the_same_rollout(default):
    waves = {j["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]:
             int(j["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for j in by_kind(default, "Job")}
    assert [waves[s] for s in STAGES] == sorted(waves[s] for s in STAGES) and len(set(waves.values())) == len(STAGES)
    serve = next(d for d in by_kind(default, "Deployment") if d["metadata"]["name"].endswith("-serve"))
    assert int(serve["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) > max(waves.values())
    run_ids = {next(e["value"] for e in j["spec"]["template"]["spec"]["containers"][0]["env"]
                    if e["name"] == "MLOPS_RUN_ID") for j in by_kind(default, "Job")}
    assert len(run_ids) == 1
    config = by_kind(default, "ConfigMap")[0]["data"]
    assert int(config["MLOPS_WAIT_SECONDS"]) >= 600


def test_redis_password_is_a_secret_never_a_literal(default):
    secret = next(s for s in by_kind(default, "Secret") if s["metadata"]["name"].endswith("-redis"))
    assert set(secret["data"]) == {"redis-password"}
    config = by_kind(default, "ConfigMap")[0]["data"]
    assert "@" not in config["MLOPS_REDIS_URL"]
    assert config["MLOPS_REDIS_PASSWORD_FILE"] == "/run/secrets/redis/redis-password"
    existing = render(values={"redis": {"existingSecret": "mine"}, "mlflow": {"auth": {"existingSecret": "m2"}}})
    assert by_kind(existing, "Secret") == []
    for _, spec in pod_specs(existing):
        vol = next(v for v in spec["volumes"] if v["name"] == "redis-password")
        assert vol["secret"]["secretName"] == "mine"


def test_values_schema_refuses_bad_values():
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    for bad in ({"image": {"tag": "latest"}}, {"pipeline": {"rows": "many"}},
                {"sharedVolume": {"hostPath": "relative/path"}}, {"unknownKey": 1},
                # an all-digit short commit given with --set (not --set-string) arrives as a number
                {"image": {"tag": 1234567}},
                # ReadWriteOncePod can never work: seven pods mount the volume
                {"sharedVolume": {"accessMode": "ReadWriteOncePod"}}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(bad))


def test_every_value_has_a_comment_above_it():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-"):
            continue
        key = stripped.split(":")[0]
        if key in ("requests", "limits", "resources", "type", "runAsNonRoot", "runAsUser", "runAsGroup",
                   "fsGroup", "seccompProfile") or line.startswith("      "):
            continue  # fields of a Kubernetes object, documented by the key above them
        assert lines[i - 1].strip().startswith("#"), f"values.yaml line {i + 1}: {stripped}"
