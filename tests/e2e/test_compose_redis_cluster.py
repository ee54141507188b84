"""The compose twin on a Redis Cluster (``compose.redis-cluster.yaml`` over
``compose.yaml``): six nodes formed into 3 masters and 3 replicas by the one-shot
init, every stage container, the feast stage's loader routing each entity to its
slot's master, and /predict reading them back over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.request

import pytest

from pipeline.dag import STAGE_NAMES
from tests.e2e.test_compose import Compose, serving_stack

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

PROJECT = "mlops-e2e-cluster"
FILES = "compose.yaml:compose.redis-cluster.yaml"
ROWS, SEED = 3000, 42
NODES = ("redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6")
# redis-cli inside a node's container, the password from its secret (never in argv or output)
CLI = 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" redis-cli --no-auth-warning'


@pytest.fixture(scope="module")
def cluster_stack():
    with serving_stack(PROJECT, MLOPS_ROWS=str(ROWS), MLOPS_SEED=str(SEED), COMPOSE_FILE=FILES) as stack:
        yield stack


def redis_cli(compose: Compose, *args: str) -> str:
    return compose("exec", "-T", "redis", "sh", "-c", f"{CLI} {' '.join(args)}").stdout


def test_the_pipeline_loads_the_cluster_and_predict_reads_it(cluster_stack):
    compose, serve = cluster_stack
    for stage in STAGE_NAMES:
        record = json.loads(compose.read(f"/shared/runs/{stage}/latest.json"))
        assert record["status"] == "ok", (stage, record["message"])
    entities = json.loads(compose.read("/shared/runs/ingest/latest.json"))["outputs"]["entities"]
    feast = json.loads(compose.read("/shared/runs/feast/latest.json"))
    assert f"loaded {entities} entities into redis" in feast["message"]
    assert "redis_cluster" in compose.read(feast["outputs"]["feature_store_yaml"])

    # three masters, each with a replica, and the entities spread over all three by slot
    nodes = [line.split() for line in redis_cli(compose, "cluster", "nodes").splitlines() if line.strip()]
    masters = [n for n in nodes if "master" in n[2]]
    replicas = [n for n in nodes if "slave" in n[2]]
    assert len(masters) == 3 and len(replicas) == 3, nodes
    assert {r[3] for r in replicas} == {m[0] for m in masters}  # each master has its replica
    held = {}
    for master in masters:
        host = master[1].partition(",")[2]  # ip:port@bus-port,announced-name
        assert host in NODES, master[1]
        held[host] = int(redis_cli(compose, "-h", host, "dbsize").strip())
    assert all(count > entities // 6 for count in held.values()), held
    assert sum(held.values()) >= entities, held

    train = json.loads(compose.read("/shared/runs/train/latest.json"))["outputs"]
    sample = int(json.loads(compose.read("/shared/runs/ingest/latest.json"))["outputs"]["sample_entity"])
    for entity in range(sample, sample + 12):  # a dozen keys, over the masters by slot
        with urllib.request.urlopen(f"{serve}/predict?customer_id={entity}", timeout=10) as resp:
            answer = json.loads(resp.read())
        features = answer["features"]
        assert set(features) == set(train["coefficients"]), answer
        want = train["intercept"] + sum(train["coefficients"][n] * v for n, v in features.items())
        assert answer["prediction"] == pytest.approx(want, rel=1e-9), entity
