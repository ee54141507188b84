"""The compose twin on a declared data set over a Redis Cluster, in one stack:
``compose.redis-cluster.yaml`` over ``compose.yaml`` (six nodes formed into 3
masters and 3 replicas by the one-shot init) and tests/data/housing (string keys,
an event time, a column left out) mounted read-only as MLOPS_DATASET_DIR. Every
stage container finishes; the model equals the local simulator's on the same
declaration; the feast stage's materialize (string keys: Feast's own; integer keys
take the project's loader, checked byte for byte on a cluster in
tests/integration/test_redis_loader.py) routes each house to its slot's master; and
/predict reads them back by their own key over real HTTP on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import urllib.error
import urllib.request

import pytest

from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES
from pipeline.io import read_record
from tests.e2e.test_compose import Compose, serving_stack
from tests.support import ROOT, make_settings, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

PROJECT = "mlops-e2e-cluster"
FILES = "compose.yaml:compose.redis-cluster.yaml"
HOUSING = ROOT / "tests" / "data" / "housing"
NODES = ("redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6")
# redis-cli inside a node's container, the password from its secret (never in argv or output)
CLI = 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" redis-cli --no-auth-warning'


@pytest.fixture(scope="module")
def cluster_stack():
    with serving_stack(PROJECT, COMPOSE_FILE=FILES, MLOPS_DATASET_DIR=str(HOUSING),
                       MLOPS_DATASET_FILE="housing.yaml") as stack:
        yield stack


def houses() -> list[str]:
    with open(HOUSING / "housing.csv", newline="") as f:
        return sorted({row["house_id"] for row in csv.DictReader(f)})


def redis_cli(compose: Compose, *args: str) -> str:
    return compose("exec", "-T", "redis", "sh", "-c", f"{CLI} {' '.join(args)}").stdout


def predict(serve: str, house: str) -> dict:
    """/predict for one house, as a client does: a 503 ("online store unreachable; retry
    shortly": a lookup over its 50 ms bound on this busy machine) is retried, for 10 s at most."""
    def answer() -> dict | None:
        try:
            with urllib.request.urlopen(f"{serve}/predict?house_id={house}", timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
            return None

    return wait_until(answer, 10, f"/predict?house_id={house} to answer other than 503", interval=0.5)


def test_a_declared_data_set_runs_in_compose_as_it_does_locally(cluster_stack, tmp_path):
    compose, serve = cluster_stack
    for stage in STAGE_NAMES:
        record = json.loads(compose.read(f"/shared/runs/{stage}/latest.json"))
        assert record["status"] == "ok", (stage, record["message"])
    remote = json.loads(compose.read("/shared/runs/train/latest.json"))["outputs"]
    assert remote["dataset"] == "housing" and remote["model_name"] == "housing"

    local = make_settings(tmp_path, dataset=HOUSING / "housing.yaml", model_name=None, seed=42)  # compose: 42
    run_stages(local, STAGE_NAMES)
    mine = read_record(local.runs_dir, "train").outputs
    assert remote["intercept"] == pytest.approx(mine["intercept"], rel=1e-9)
    for name, value in mine["coefficients"].items():
        assert remote["coefficients"][name] == pytest.approx(value, rel=1e-9), name

    answer = predict(serve, "H-007")
    assert answer["house_id"] == "H-007" and answer["model"]["name"] == "housing"
    features = answer["features"]
    want = mine["intercept"] + sum(mine["coefficients"][n] * features[n] for n in features)
    assert answer["prediction"] == pytest.approx(want, rel=1e-9)


def test_the_houses_are_spread_over_the_masters_and_predict_reads_them(cluster_stack):
    compose, serve = cluster_stack
    keys = houses()
    feast = json.loads(compose.read("/shared/runs/feast/latest.json"))
    assert feast["message"] == "applied housing, materialized into redis", feast["message"]
    assert "redis_cluster" in compose.read(feast["outputs"]["feature_store_yaml"])

    # three masters, each with a replica, and the houses spread over all three by slot
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
    assert all(count > len(keys) // 6 for count in held.values()), held

    train = json.loads(compose.read("/shared/runs/train/latest.json"))["outputs"]
    for house in keys:  # every house, from whichever master holds its slot
        answer = predict(serve, house)
        assert answer["house_id"] == house, answer
        features = answer["features"]
        assert set(features) == set(train["coefficients"]), answer
        want = train["intercept"] + sum(train["coefficients"][n] * v for n, v in features.items())
        assert answer["prediction"] == pytest.approx(want, rel=1e-9), house
