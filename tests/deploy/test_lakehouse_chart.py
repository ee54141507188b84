"""The chart with the lakehouse (``objectStore.lakehouse``): the ConfigMap turns it on
for every pipeline pod with the object store's settings, every pipeline pod gets the
keys as files (never as values): serve and the monitor the read-only identity's (as in
compose.lakehouse.yaml), the others the keys that write; the MLflow server keeps its
artifacts in the bucket; off, nothing of the store reaches the stages; without the
object store, or without a read-only identity for the pods that only read, it is refused."""

from __future__ import annotations

import pytest

from pipeline.settings import known_variables
from tests.deploy.chart import by_kind, render

STORE = {"enabled": True, "endpoint": "http://seaweedfs.storage:8333", "bucket": "data",
         "prefix": "/team-a/prod/", "accessKey": "AKIA-chart-test", "secretKey": "s3cr3t-chart-test"}
READ_ONLY = {"accessKey": "AKIA-read-only-test", "secretKey": "r3ad-0nly-chart-test"}


def config_data(objects: list[dict]) -> dict[str, str]:
    return next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))["data"]


def pods(objects: list[dict]) -> dict[str, dict]:
    """Every pipeline pod spec by component: the stage Jobs, serve, mlflow, the CronJobs."""
    found = {}
    for obj in by_kind(objects, "Job") + by_kind(objects, "Deployment") + by_kind(objects, "CronJob"):
        spec = (obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"])["template"]["spec"]
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        if component not in ("redis", "monitor-exporter"):  # neither talks to the store
            found[component if obj["kind"] != "CronJob" else f"cron-{component}"] = spec
    return found


def test_the_lakehouse_reaches_every_pipeline_pod_with_the_keys_as_files():
    objects = render(values={"objectStore": {**STORE, "lakehouse": True, "serve": READ_ONLY},
                             "monitoring": {"enabled": True}, "retrain": {"enabled": True}})
    data = config_data(objects)
    assert data["MLOPS_LAKEHOUSE"] == "true"
    assert data["MLOPS_S3_ENDPOINT"] == STORE["endpoint"] and data["MLOPS_S3_BUCKET"] == "data"
    assert data["MLOPS_S3_PREFIX"] == "/team-a/prod/"
    assert {k for k in data if k.startswith("MLOPS_")} <= known_variables()
    assert STORE["accessKey"] not in str(data) and STORE["secretKey"] not in str(data)

    found = pods(objects)
    assert {"ingest", "features", "feast", "train", "promote", "monitor", "serve", "mlflow",
            "cron-monitor", "cron-retrain", "cron-backup"} <= found.keys()
    secrets = {o["metadata"]["name"]: o for o in by_kind(objects, "Secret")}
    secret, read_only = secrets["mlops-shared-volume-objectstore"], secrets["mlops-shared-volume-objectstore-serve"]
    for name, spec in found.items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        # serve and the monitor only read the bucket: the read-only identity; everything else may write
        expected = read_only if name in ("serve", "monitor", "cron-monitor") else secret
        assert volumes["s3-keys"]["secret"]["secretName"] == expected["metadata"]["name"], name
        for container in spec["containers"]:
            mounts = [m for m in container["volumeMounts"] if m["name"] == "s3-keys"]
            assert len(mounts) == 1 and mounts[0]["mountPath"] == "/run/secrets/s3", (name, container["name"])
            assert mounts[0]["readOnly"] is True
    # the key files the settings name are the Secret's keys, mounted there
    assert {data["MLOPS_S3_ACCESS_KEY_FILE"], data["MLOPS_S3_SECRET_KEY_FILE"]} == {
        f"/run/secrets/s3/{key}" for key in secret["data"]}


def test_the_tracking_server_keeps_artifacts_in_the_bucket():
    objects = render(values={"objectStore": {**STORE, "lakehouse": True, "serve": READ_ONLY}})
    server = pods(objects)["mlflow"]["containers"][0]
    assert "--artifacts-destination=s3://data/team-a/prod/lakehouse/mlflow" in server["command"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == STORE["endpoint"]
    # the image's entrypoint turns the files into AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    assert env["AWS_ACCESS_KEY_ID_FILE"] == "/run/secrets/s3/access_key"
    assert env["AWS_SECRET_ACCESS_KEY_FILE"] == "/run/secrets/s3/secret_key"
    assert "AWS_ACCESS_KEY_ID" not in env and STORE["secretKey"] not in str(server)


def test_off_by_default_nothing_of_the_store_reaches_the_stages():
    for values in ({}, {"objectStore": STORE}):  # the backup alone keeps the stages on the volume
        objects = render(values=values)
        data = config_data(objects)
        assert data["MLOPS_LAKEHOUSE"] == "false"
        assert not [k for k in data if k.startswith("MLOPS_S3_")]
        for name, spec in pods(objects).items():
            has_keys = any(v["name"] == "s3-keys" for v in spec["volumes"])
            assert has_keys == (name == "cron-backup"), name
        server = pods(objects)["mlflow"]["containers"][0]
        assert "--artifacts-destination=/shared/mlflow/server/artifacts" in server["command"]


def test_the_lakehouse_without_the_object_store_is_refused():
    with pytest.raises(Exception, match="objectStore.lakehouse needs the object store"):
        render(values={"objectStore": {"lakehouse": True}})


def test_the_lakehouse_without_a_read_only_identity_for_serve_is_refused():
    # an external store's keys cannot be made up: the store must know them
    with pytest.raises(Exception, match=r"objectStore.serve.accessKey \(or objectStore.serve.existingSecret\) "
                                        r"is required with objectStore.lakehouse: serve and the monitor read"):
        render(values={"objectStore": {**STORE, "lakehouse": True}})
    objects = render(values={"objectStore": {**STORE, "lakehouse": True, "serve": {"existingSecret": "s3-reader"}}})
    assert not [s for s in by_kind(objects, "Secret") if s["metadata"]["name"].endswith("-objectstore-serve")]
    for name in ("serve", "monitor"):
        volumes = {v["name"]: v for v in pods(objects)[name]["volumes"]}
        assert volumes["s3-keys"]["secret"]["secretName"] == "s3-reader", name
