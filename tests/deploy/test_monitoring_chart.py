"""The chart's optional monitoring and backup objects, checked offline: the monitor and
retrain CronJobs, the monitor exporter, the PrometheusRule and the Grafana dashboard
(copies of monitoring/, held equal to it here), one ServiceMonitor per target, and the
backup CronJob against an external S3 with its keys as files."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.settings import known_variables
from tests.conftest import ROOT
from tests.deploy.chart import CHART, SCHEMAS, by_kind, pod_specs, render
from tests.support import load_script

EVERYTHING = load_script("render_chart").EVERYTHING
S3 = {"enabled": True, "endpoint": "https://s3.eu-west-1.amazonaws.com", "bucket": "my-backups",
      "prefix": "prod/", "region": "eu-west-1", "accessKey": "AKIDEXAMPLE", "secretKey": "not-a-real-key"}
# Everything of this file on, over the set `nox -s helm_check` renders.
MONITORED = {**EVERYTHING,
             "serviceMonitor": {"enabled": True},
             "monitoring": {"enabled": True, "schedule": "*/15 * * * *",
                            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
                            "dashboard": {"enabled": True}},
             "retrain": {"enabled": True, "schedule": "0 4 * * 1"},
             "objectStore": S3,
             "backup": {"schedule": "30 1 * * *", "keep": 3}}
# The copies the chart reads (Helm reads no file outside the chart) and their sources.
COPIES = {"files/prometheus-rules.yml": "monitoring/prometheus/rules.yml",
          "files/grafana-dashboard.json": "monitoring/grafana/dashboard.json"}


@pytest.fixture(scope="module")
def monitored():
    return render(values=MONITORED)


def named(objects: list[dict], kind: str, suffix: str) -> dict:
    return next(o for o in by_kind(objects, kind) if o["metadata"]["name"].endswith(suffix))


@pytest.mark.parametrize("copy, source", COPIES.items())
def test_the_charts_copies_equal_monitoring(copy, source):
    assert (CHART / copy).read_bytes() == (ROOT / source).read_bytes(), (
        f"helm/shared-volume/{copy} differs from {source}: cp {source} helm/shared-volume/{copy}")


def test_nothing_of_it_is_rendered_by_default_and_the_stage_jobs_keep_their_names(monitored):
    default = render()
    kinds = {o["kind"] for o in default}
    assert not kinds & {"CronJob", "PrometheusRule", "ServiceMonitor"}
    assert not [o for o in default if o["metadata"]["name"].endswith(("-monitor-exporter", "-objectstore",
                                                                       "-dashboard"))]
    # turning monitoring and backups on changes no setting of the stages: no new rollout
    jobs = lambda objs: sorted(j["metadata"]["name"] for j in by_kind(objs, "Job"))
    assert jobs(monitored) == jobs(render(values=EVERYTHING))


def test_every_object_is_valid_kubernetes_or_valid_against_its_crd(monitored):
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    crds = {kind: json.loads((SCHEMAS / "monitoring.coreos.com" / f"{kind.lower()}_v1.json").read_text())
            for kind in ("ServiceMonitor", "PrometheusRule")}
    seen = set()
    for obj in monitored:
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            # not jsonschema.validate: it first checks the schema itself, and the operator's CRD has a
            # Go (RE2) pattern Python's re refuses ('^(?i)(abort|warn)?$', a field we do not set)
            schema = crds[obj["kind"]]
            jsonschema.validators.validator_for(schema)(schema).validate(obj)
            seen.add(obj["kind"])
        else:
            kubernetes_validate.validate(obj, version, strict=True)
    assert seen == set(crds)


def test_every_pod_meets_the_restricted_profile_and_sets_only_known_settings(monitored):
    specs = dict(pod_specs(monitored))
    assert {"CronJob/mlops-shared-volume-monitor", "CronJob/mlops-shared-volume-retrain",
            "CronJob/mlops-shared-volume-backup", "Deployment/mlops-shared-volume-monitor-exporter"} <= set(specs)
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (name, c["name"])
            unknown = sorted(e["name"] for e in c.get("env", [])
                             if e["name"].startswith("MLOPS_") and e["name"] not in known_variables())
            assert not unknown, f"{name} sets {unknown}, unknown to Settings"


def test_the_cronjobs_run_the_pipeline_commands_on_their_schedules_one_at_a_time(monitored):
    expected = {"monitor": ("*/15 * * * *", "monitor"), "retrain": ("0 4 * * 1", "retrain"),
                "backup": ("30 1 * * *", "backup")}
    cron = {c["metadata"]["labels"]["app.kubernetes.io/component"]: c for c in by_kind(monitored, "CronJob")}
    assert set(cron) == set(expected)
    for name, (schedule, command) in expected.items():
        spec = cron[name]["spec"]
        assert spec["schedule"] == schedule and spec["concurrencyPolicy"] == "Forbid", name
        container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][-3:] == ["-m", "pipeline", command], name
        # the Jobs a CronJob starts are not stage Jobs: deploy_minikube's wait (mlops/role=stage) skips them
        assert cron[name]["spec"]["jobTemplate"]["metadata"]["labels"]["mlops/role"] != "stage"


def test_the_backup_cronjob_reaches_the_external_store_with_its_keys_as_files(monitored):
    spec = named(monitored, "CronJob", "-backup")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLOPS_S3_ENDPOINT"] == S3["endpoint"] and env["MLOPS_S3_BUCKET"] == "my-backups"
    assert env["MLOPS_S3_PREFIX"] == "prod/" and env["MLOPS_S3_REGION"] == "eu-west-1"
    assert env["MLOPS_BACKUP_KEEP"] == "3"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "s3-keys")
    assert mount["readOnly"] and env["MLOPS_S3_ACCESS_KEY_FILE"] == f"{mount['mountPath']}/access_key"
    assert env["MLOPS_S3_SECRET_KEY_FILE"] == f"{mount['mountPath']}/secret_key"
    assert any(m["name"] == "shared" and m["mountPath"] == "/shared" for m in container["volumeMounts"])
    secret = named(monitored, "Secret", "-objectstore")
    assert set(secret["data"]) == {"access_key", "secret_key"}
    assert next(v for v in spec["volumes"] if v["name"] == "s3-keys")["secret"]["secretName"] == \
        secret["metadata"]["name"]
    assert "not-a-real-key" not in json.dumps(monitored)  # only base64 in the Secret, never plain
    # the keys never reach another pod
    for name, other in pod_specs(monitored):
        if not name.endswith("-backup"):
            assert all(v["name"] != "s3-keys" for v in other["volumes"]), name


def test_an_existing_secret_replaces_the_charts_and_an_endpoint_is_required():
    import helm_python as helm

    objects = render(values={"objectStore": {"enabled": True, "endpoint": "http://minio:9000",
                                             "existingSecret": "s3-keys-of-mine"}})
    assert not [s for s in by_kind(objects, "Secret") if s["metadata"]["name"].endswith("-objectstore")]
    spec = named(objects, "CronJob", "-backup")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert next(v for v in spec["volumes"] if v["name"] == "s3-keys")["secret"]["secretName"] == "s3-keys-of-mine"
    with pytest.raises(Exception, match="objectStore.endpoint is required"):
        render(values={"objectStore": {"enabled": True, "existingSecret": "s3-keys-of-mine"}})
    with pytest.raises(Exception, match="objectStore.accessKey"):
        render(values={"objectStore": {"enabled": True, "endpoint": "http://minio:9000"}})
    chart = helm.Chart.load(str(CHART))
    for bad in ({"backup": {"keep": 0}}, {"retrain": {"schedule": "weekly"}},
                {"objectStore": {"endpoint": "s3.amazonaws.com"}}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(bad))


def test_the_exporter_reads_the_volume_only_and_is_scraped_through_its_service(monitored):
    deployment = named(monitored, "Deployment", "-monitor-exporter")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][-4:] == ["-m", "pipeline.monitor_exporter", "--port", "9108"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9108}]
    shared = next(m for m in container["volumeMounts"] if m["name"] == "shared")
    assert shared["mountPath"] == "/shared" and shared["readOnly"] is True
    assert next(v for v in pod["volumes"] if v["name"] == "shared")["persistentVolumeClaim"]["readOnly"] is True
    assert {m["name"] for m in container["volumeMounts"]}.isdisjoint({"redis-password", "mlflow-password"})
    # it mounts the volume: kept on the volume's node like every other pod that does
    assert pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    service = named(monitored, "Service", "-monitor-exporter")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_one_servicemonitor_per_target_each_selecting_its_service(monitored):
    monitors = by_kind(monitored, "ServiceMonitor")
    services = by_kind(monitored, "Service")
    targets = {}
    for monitor in monitors:
        selected = [s for s in services
                    if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert len(selected) == 1, monitor["metadata"]["name"]
        port = monitor["spec"]["endpoints"][0]["port"]
        assert port in {p["name"] for p in selected[0]["spec"]["ports"]}
        targets[selected[0]["metadata"]["name"]] = port
    assert targets == {"mlops-shared-volume-serve": "http", "mlops-shared-volume-monitor-exporter": "metrics"}


def test_the_prometheusrule_holds_the_rules_promtool_tests(monitored):
    rule = by_kind(monitored, "PrometheusRule")[0]
    source = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    # the alert templates reach Prometheus as written, not evaluated by Helm
    assert any("{{ $labels.job }}" in r.get("annotations", {}).get("summary", "")
               for g in rule["spec"]["groups"] for r in g["rules"])


def test_the_dashboard_configmap_is_for_grafanas_sidecar(monitored):
    config = named(monitored, "ConfigMap", "-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = config["data"].values()
    assert json.loads(text) == json.loads((ROOT / "monitoring" / "grafana" / "dashboard.json").read_text())
