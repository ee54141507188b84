"""The chart's bundled object store (``objectStore.bundled``) and its two identities: a
one-node SeaweedFS StatefulSet with its PVC behind a ClusterIP Service that the pipeline
points at, its identities file built at start from the two identities' Secrets (never
from values), serve and the monitor with the read-only identity's keys and never the keys
that write; combinations that cannot work are refused with one clear message."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.objectstore import identities
from tests.deploy.chart import CHART, by_kind, pod_specs, render

BUNDLED = {"objectStore": {"enabled": True, "bundled": {"enabled": True}}}
LAKEHOUSE = {"objectStore": {"enabled": True, "lakehouse": True, "bucket": "team-data",
                             "bundled": {"enabled": True}},
             "monitoring": {"enabled": True}, "retrain": {"enabled": True}, "networkPolicy": {"enabled": True}}
SERVICE = "mlops-shared-volume-seaweedfs"
WRITER, READER = "mlops-shared-volume-objectstore", "mlops-shared-volume-objectstore-serve"


@pytest.fixture(scope="module")
def bundled():
    return render(values=BUNDLED)


@pytest.fixture(scope="module")
def lakehouse():
    return render(values=LAKEHOUSE)


def named(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in by_kind(objects, kind) if o["metadata"]["name"] == name)


def store_pod(objects: list[dict]) -> dict:
    return named(objects, "StatefulSet", SERVICE)["spec"]["template"]["spec"]


def secret_refs(spec: dict) -> set[str]:
    """Every Secret a pod spec names: volumes (plain and projected), env and envFrom."""
    names = set()
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for container in spec.get("initContainers", []) + spec["containers"]:
        for var in container.get("env", []):
            if "secretKeyRef" in var.get("valueFrom", {}):
                names.add(var["valueFrom"]["secretKeyRef"]["name"])
        names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    return names


def pipeline_pods(objects: list[dict]) -> dict[str, dict]:
    """The pods that talk to the store, by component (CronJobs as cron-<component>)."""
    found = {}
    for obj in by_kind(objects, "Job") + by_kind(objects, "Deployment") + by_kind(objects, "CronJob"):
        spec = (obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"])["template"]["spec"]
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        if component not in ("redis", "monitor-exporter"):
            found[component if obj["kind"] != "CronJob" else f"cron-{component}"] = spec
    return found


def decoded(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_bundled_is_one_seaweedfs_node_with_its_pvc_behind_a_clusterip_service(bundled):
    store = named(bundled, "StatefulSet", SERVICE)
    assert store["spec"]["replicas"] == 1
    claim = store["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = store_pod(bundled)
    weed = pod["containers"][0]
    assert weed["image"] == "chrislusf/seaweedfs:4.48"
    # the data on the PVC, the bucket made at start, the identities from the init container's file
    assert weed["command"][:3] == ["/usr/bin/weed", "-logtostderr=true", "mini"]
    assert {"-dir=/data", "-bucket=mlops", "-s3.config=/config/identities.json",
            "-master.telemetry=false"} <= set(weed["command"])
    assert {m["mountPath"]: m["name"] for m in weed["volumeMounts"]}["/data"] == claim["metadata"]["name"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert weed[probe]["httpGet"] == {"path": "/healthz", "port": "s3"}, probe
    assert {"name": "s3", "containerPort": 8333} in weed["ports"]

    service = named(bundled, "Service", SERVICE)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "s3", "port": 8333, "targetPort": "s3"}]
    labels = store["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert store["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_helm_lint_is_clean():
    import helm_python as helm

    for values in (BUNDLED, LAKEHOUSE):
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


def test_the_store_pod_meets_the_restricted_profile(bundled):
    pod = store_pod(bundled)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["fsGroup"]  # the PVC is writable by the non-root user
    assert pod["automountServiceAccountToken"] is False
    for container in pod["initContainers"] + pod["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys(), container["name"]


@pytest.mark.parametrize("values", [BUNDLED, LAKEHOUSE], ids=["bundled", "bundled-lakehouse"])
def test_every_object_is_valid_kubernetes(values):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    objects = render(values=values)
    assert by_kind(objects, "StatefulSet")
    for obj in objects:
        if not obj["apiVersion"].startswith("monitoring.coreos.com"):
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_pipeline_points_at_the_bundled_store(bundled, lakehouse):
    endpoint = f"http://{SERVICE}:8333"
    backup = pipeline_pods(bundled)["cron-backup"]["containers"][0]
    assert {e["name"]: e.get("value") for e in backup["env"]}["MLOPS_S3_ENDPOINT"] == endpoint
    config = named(lakehouse, "ConfigMap", "mlops-shared-volume-config")["data"]
    assert config["MLOPS_S3_ENDPOINT"] == endpoint and config["MLOPS_S3_BUCKET"] == "team-data"
    server = pipeline_pods(lakehouse)["mlflow"]["containers"][0]
    assert {e["name"]: e.get("value") for e in server["env"]}["MLFLOW_S3_ENDPOINT_URL"] == endpoint
    # and the store makes that bucket
    assert "-bucket=team-data" in store_pod(lakehouse)["containers"][0]["command"]


def test_serve_and_the_monitor_read_with_the_read_only_identity_never_the_keys_that_write(lakehouse):
    pods = pipeline_pods(lakehouse)
    assert {"serve", "monitor", "cron-monitor", "train", "cron-backup", "cron-retrain", "mlflow"} <= pods.keys()
    for name, spec in pods.items():
        refs = secret_refs(spec)
        if name in ("serve", "monitor", "cron-monitor"):
            assert READER in refs and WRITER not in refs, name
        else:
            assert WRITER in refs and READER not in refs, name
        # wherever they come from, the keys are the files the settings name
        mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c["volumeMounts"]}
        assert mounts["/run/secrets/s3"] == "s3-keys", name
    # nothing hands the keys over as values: no key appears in any pod spec
    keys = {v for s in (WRITER, READER) for v in decoded(named(lakehouse, "Secret", s)).values()}
    for name, spec in pod_specs(lakehouse):
        assert not [k for k in keys if k in json.dumps(spec)], name


def test_the_store_builds_its_identities_from_the_two_secrets(lakehouse):
    pod = store_pod(lakehouse)
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")["projected"]["sources"]
    assert [(s["secret"]["name"], [i["path"] for i in s["secret"]["items"]]) for s in keys] == [
        (WRITER, ["backup/access_key", "backup/secret_key"]), (READER, ["serve/access_key", "serve/secret_key"])]
    # the keys are generated (none were given) and differ between the identities
    writer, reader = decoded(named(lakehouse, "Secret", WRITER)), decoded(named(lakehouse, "Secret", READER))
    assert writer["access_key"].startswith("backup-") and reader["access_key"].startswith("serve-")
    assert len(writer["secret_key"]) >= 40 and writer["secret_key"] != reader["secret_key"]


def identities_file(pod: dict, home: Path, keys: dict[str, tuple[str, str]]) -> subprocess.CompletedProcess:
    """Run the store pod's init container's script with sh on key files under ``home``."""
    init = pod["initContainers"][0]
    assert init["command"] == ["/bin/sh", "-c"]
    for role, (access, secret) in keys.items():
        (home / "keys" / role).mkdir(parents=True, exist_ok=True)
        # a trailing newline, as `kubectl create secret --from-file` keeps one from a file
        (home / "keys" / role / "access_key").write_text(access + "\n")
        (home / "keys" / role / "secret_key").write_text(secret)
    env = {e["name"]: e["value"] for e in init["env"]}
    env |= {"KEYS": str(home / "keys"), "CONFIG": str(home / "identities.json"), "PATH": os.environ["PATH"]}
    return subprocess.run(["sh", "-c", init["args"][0]], env=env, capture_output=True, text=True, timeout=30)


def test_the_identities_file_has_pipeline_objectstores_rights(lakehouse, tmp_path):
    keys = {"backup": ("backup-0123", "s3cr3t+/Key=="), "serve": ("serve-4567", "r3ad.only_key~-")}
    done = identities_file(store_pod(lakehouse), tmp_path, keys)
    assert done.returncode == 0, done.stderr
    built = json.loads((tmp_path / "identities.json").read_text())
    reference, _ = identities("team-data")
    assert [(i["name"], i["actions"]) for i in built["identities"]] == [
        (i["name"], i["actions"]) for i in reference["identities"]]
    assert [i["credentials"] for i in built["identities"]] == [
        [{"accessKey": access, "secretKey": secret}] for access, secret in keys.values()]


def test_a_key_json_cannot_hold_is_refused_without_printing_it(lakehouse, tmp_path):
    done = identities_file(store_pod(lakehouse), tmp_path, {"backup": ("backup-0123", 'bad"key'),
                                                            "serve": ("serve-4567", "fine")})
    assert done.returncode != 0
    assert "backup/secret_key: empty, or holds a character other than" in done.stderr
    assert 'bad"key' not in done.stderr + done.stdout
    assert not (tmp_path / "identities.json").exists() or not (tmp_path / "identities.json").read_text()


def test_keys_given_or_existing_secrets_replace_the_generated_ones():
    given = render(values={"objectStore": {"enabled": True, "bundled": {"enabled": True}, "accessKey": "mine",
                                           "secretKey": "my-secret", "serve": {"existingSecret": "readers"}}})
    assert decoded(named(given, "Secret", WRITER)) == {"access_key": "mine", "secret_key": "my-secret"}
    assert not [s for s in by_kind(given, "Secret") if s["metadata"]["name"] == READER]
    assert "readers" in secret_refs(store_pod(given))


def test_keys_changed_in_values_restart_the_store():
    """The identities file is built at start: new keys must roll the pod, or the store keeps refusing them."""
    def checksum(key: str) -> str:
        values = {"objectStore": {**BUNDLED["objectStore"], "accessKey": "writer", "secretKey": key}}
        pod = named(render(values=values), "StatefulSet", SERVICE)["spec"]["template"]
        return pod["metadata"]["annotations"]["checksum/identities"]

    assert checksum("first-secret-key-0123456789") != checksum("second-secret-key-0123456789")


def test_only_the_release_reaches_the_s3_port(lakehouse):
    policy = named(lakehouse, "NetworkPolicy", SERVICE)
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "seaweedfs"
    assert policy["spec"]["ingress"] == [{
        "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "shared-volume",
                                                  "app.kubernetes.io/instance": "mlops"}}}],
        "ports": [{"port": 8333}]}]


def test_off_by_default_nothing_of_the_bundled_store(bundled):
    for values in ({}, {"objectStore": {"enabled": True, "endpoint": "http://minio:9000", "accessKey": "a",
                                        "secretKey": "b"}}):
        objects = render(values=values)
        assert not by_kind(objects, "StatefulSet")
        assert not [o for o in objects if SERVICE in o["metadata"]["name"] or o["metadata"]["name"] == READER]


@pytest.mark.parametrize("values, message", [
    ({"objectStore": {"enabled": True, "endpoint": "http://minio:9000", "bundled": {"enabled": True}}},
     "objectStore.bundled.enabled and objectStore.endpoint: the bundled SeaweedFS is the endpoint"),
    ({"objectStore": {"bundled": {"enabled": True}}},
     "objectStore.bundled.enabled deploys a store nothing would use: set objectStore.enabled too"),
    ({"objectStore": {"enabled": True, "existingSecret": "s3-keys"}},
     r"objectStore.endpoint is required with objectStore.enabled: .*or objectStore.bundled.enabled"),
], ids=["bundled-and-endpoint", "bundled-without-enabled", "neither"])
def test_combinations_that_cannot_work_are_refused(values, message):
    with pytest.raises(Exception, match=message):
        render(values=values)


def test_values_schema_refuses_bad_bundled_values():
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    for bad in ({"image": {"repository": "chrislusf/seaweedfs", "tag": "latest"}}, {"port": 80},
                {"size": "lots"}, {"replicas": 3}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values({"objectStore": {"bundled": bad}}))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.integration
def test_seaweedfs_runs_the_rendered_store_and_serve_cannot_write(lakehouse, tmp_path):
    """The pod's two containers on this machine: the init script's identities file and the
    rendered `weed mini` command (ports, data folder and bind address moved to free local
    ones); backup writes to the bucket the store made, serve reads and is refused a write."""
    from pipeline.objectstore import weed_binary

    try:
        weed = weed_binary()
    except Exception as exc:
        pytest.skip(str(exc))
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import ClientError

    keys = {"backup": ("backup-test", "write-secret-key"), "serve": ("serve-test", "read-secret-key")}
    pod = store_pod(lakehouse)
    assert identities_file(pod, tmp_path, keys).returncode == 0
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port"]
    ports = dict(zip(names, _free_ports(len(names))))
    moved = {"-dir": str(tmp_path / "data"), "-s3.config": str(tmp_path / "identities.json"),
             "-ip.bind": "127.0.0.1", **{f"-{n}": str(p) for n, p in ports.items()}}
    (tmp_path / "data").mkdir()
    argv = [weed]
    for arg in pod["containers"][0]["command"][1:]:
        flag = arg.split("=")[0]
        argv.append(f"{flag}={moved.pop(flag)}" if flag in moved else arg)
    argv += [f"{flag}={value}" for flag, value in moved.items()]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"

    def client(role: str):
        access, secret = keys[role]
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access,
            aws_secret_access_key=secret, config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    with open(tmp_path / "weed.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        writer, reader = client("backup"), client("serve")
        deadline = time.monotonic() + 60
        while True:  # the bucket is made just after the gateway answers
            try:
                writer.head_bucket(Bucket="team-data")
                break
            except Exception:
                assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-2000:]
                assert time.monotonic() < deadline, (tmp_path / "weed.log").read_text()[-2000:]
                time.sleep(0.3)
        writer.put_object(Bucket="team-data", Key="lakehouse/current.json", Body=b"{}")
        assert reader.get_object(Bucket="team-data", Key="lakehouse/current.json")["Body"].read() == b"{}"
        assert [o["Key"] for o in reader.list_objects_v2(Bucket="team-data")["Contents"]] == ["lakehouse/current.json"]
        with pytest.raises(ClientError, match="AccessDenied"):
            reader.put_object(Bucket="team-data", Key="lakehouse/current.json", Body=b"tampered")
        with pytest.raises(ClientError, match="AccessDenied"):
            reader.delete_object(Bucket="team-data", Key="lakehouse/current.json")
        assert reader.get_object(Bucket="team-data", Key="lakehouse/current.json")["Body"].read() == b"{}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
