"""The chart with an external Redis Cluster as the online store (``redis.cluster``):
the ConfigMap names the cluster and sets MLOPS_REDIS_CLUSTER, which the pipeline's
settings and Feast's config read as a cluster; the bundled Redis is not deployed; the
password still comes from the Secret."""

from __future__ import annotations

import pytest

from pipeline.feast import online_store_config
from pipeline.settings import Settings, known_variables
from tests.deploy.chart import by_kind, pod_specs, render, values_file

CLUSTER = values_file("ci/redis-cluster-values.yaml")
URL = CLUSTER["redis"]["cluster"]["url"]


@pytest.fixture(scope="module")
def on_cluster() -> list[dict]:
    return render(values=CLUSTER)


def config_data(objects: list[dict]) -> dict[str, str]:
    return next(o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config"))["data"]


def redis_objects(objects: list[dict]) -> list[str]:
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects
                  if o["metadata"]["name"].endswith("-redis") and o["kind"] != "Secret")


def test_the_pipeline_reads_the_configmap_as_a_redis_cluster(on_cluster):
    data = config_data(on_cluster)
    assert data["MLOPS_REDIS_URL"] == URL and data["MLOPS_REDIS_CLUSTER"] == "true"
    assert {k for k in data if k.startswith("MLOPS_")} <= known_variables()
    settings = Settings(**{k[len("MLOPS_"):].lower(): v for k, v in data.items()
                           if k in ("MLOPS_REDIS_URL", "MLOPS_REDIS_CLUSTER")})
    assert settings.redis_cluster is True
    feast = online_store_config(settings)
    assert feast["redis_type"] == "redis_cluster"
    assert feast["connection_string"].startswith("redis-cluster.data.svc.cluster.local:6379,")


def test_the_bundled_redis_is_not_deployed_and_the_secret_is_still_mounted(on_cluster):
    default = render(values={"networkPolicy": {"enabled": True}})
    assert redis_objects(default) == ["Deployment/mlops-shared-volume-redis",
                                      "NetworkPolicy/mlops-shared-volume-redis",
                                      "PersistentVolumeClaim/mlops-shared-volume-redis",
                                      "Service/mlops-shared-volume-redis"]
    assert "MLOPS_REDIS_CLUSTER" not in config_data(default)
    assert redis_objects(on_cluster) == []
    for name, spec in pod_specs(on_cluster):
        if name.startswith("Job/") and "feast" in name or name.endswith("-serve"):
            secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
            assert "online-store-cluster" in secrets, name


def test_every_object_is_valid_kubernetes(on_cluster):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    for obj in on_cluster:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("url, why", [
    ("", "minLength"),  # enabled without a node to reach
    ("redis://:secret@redis-cluster:6379/0", "pattern"),  # a password in the ConfigMap
    ("redis://redis-cluster:6379/3", "pattern"),  # a cluster has database 0 only
])
def test_the_schema_refuses_a_cluster_url_the_pipeline_could_not_use_safely(url, why):
    with pytest.raises(Exception, match=why):
        render(values={"redis": {"existingSecret": "cluster-keys", "cluster": {"enabled": True, "url": url}}})


def test_a_cluster_without_its_password_is_refused_at_render_time():
    """A generated password would not be the external cluster's: every pod would fail to log in."""
    with pytest.raises(Exception, match="redis.existingSecret"):
        render(values={"redis": {"cluster": {"enabled": True, "url": "redis://redis-cluster:6379/0"}}})
