"""A Redis Cluster as the online store (``MLOPS_REDIS_CLUSTER``): the pipeline loads
it, Feast's SDK reads it, ``/predict`` over granian answers from it exactly as from
one Redis, and a master killed with SIGKILL costs quick 503s until its replica
takes over, then service comes back by itself. The cluster is real: 3 masters
and 3 replicas of Debian's redis-server with append-only files
(tests/cluster_support.py)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import redis
from redis.crc import key_slot
from werkzeug.test import Client

from pipeline.cli import run_stages
from pipeline.dataset import CUSTOMERS as schema
from pipeline.errors import ConfigError
from pipeline.feast import online_features, open_store
from pipeline.io import read_record
from pipeline.redis_layout import FeastRedisLayout, connect, loaded_marker
from pipeline.redis_loader import load_latest
from tests.cluster_support import cluster_or_skip, redis_single
from tests.service.fakes import metrics_in_memory
from tests.support import clean_env, make_settings, running_server

pytestmark = pytest.mark.integration

ROWS, SEED = 2000, 13
STAGES = ("ingest", "features", "feast", "train", "promote")  # all serve needs (no monitor)
RECOVERY_BOUND_S, MAX_SECONDS, SLOW_ANSWER_S = 30.0, 40.0, 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from cluster_or_skip(tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="module")
def run(cluster, tmp_path_factory):
    """The stages serve needs, with the cluster as the online store."""
    shared = tmp_path_factory.mktemp("shared-cluster")
    settings = make_settings(shared, rows=ROWS, seed=SEED, redis_url=cluster.url(), redis_cluster=True)
    run_stages(settings, STAGES)
    env = clean_env(MLOPS_SHARED_DIR=str(shared), MLOPS_REDIS_URL=cluster.url(), MLOPS_REDIS_CLUSTER="true")
    return {"settings": settings, "env": env}


@pytest.fixture(scope="module")
def server(run):
    with running_server(run["env"], workers=1) as base:
        yield base


@pytest.fixture(scope="module")
def latest(run) -> pd.DataFrame:
    feats = pd.read_parquet(run["settings"].features_path)
    return feats.sort_values(schema.timestamp).groupby(schema.join_key).last()[list(schema.feature_names)]


def call(url: str, data: dict | None = None) -> tuple[int, dict, float]:
    """Status, JSON body and seconds of one request."""
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), time.monotonic() - started
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), time.monotonic() - started


def test_the_feast_stage_spreads_the_entities_over_every_master_and_feast_reads_them(run, cluster, latest):
    settings = run["settings"]
    counts = {port: cluster.node(port).dbsize() for port in cluster.masters()}
    assert len(counts) == 3 and all(n > len(latest) // 6 for n in counts.values()), counts
    assert sum(counts.values()) == len(latest) + 1  # every entity, and the loaded marker
    yaml = (settings.feast_dir / "feature_store.yaml").read_text()
    assert "redis_type: redis_cluster" in yaml and cluster.password not in yaml
    ids = [int(i) for i in latest.index]
    values = online_features(open_store(settings), schema, ids)  # Feast's own RedisCluster client
    for name in schema.feature_names:
        assert np.array_equal(np.array(values[name], dtype=float), latest[name].to_numpy()), name


def test_predict_from_the_cluster_equals_the_plain_redis_path(run, server, latest, tmp_path, monkeypatch):
    ids = [int(i) for i in latest.index]
    status, cluster_answer, _ = call(f"{server}/predict", {"instances": [{schema.join_key: i} for i in ids]})
    assert status == 200
    singles = [call(f"{server}/predict?{schema.join_key}={i}")[1]["prediction"] for i in ids[:: len(ids) // 7]]

    # The same model and features through one Redis: our loader and the plain reader.
    metrics_in_memory(monkeypatch)
    from pipeline.serve import create_app

    with redis_single(tmp_path / "plain") as url:
        plain = make_settings(run["settings"].shared_dir, rows=ROWS, seed=SEED, redis_url=url)
        load_latest(connect(plain, 10), plain.features_path, schema)
        connect(plain, 10).set(loaded_marker(schema), "x")
        client = Client(create_app(plain, watch=False))
        resp = client.post("/predict", json={"instances": [{schema.join_key: i} for i in ids]})
        plain_answer = json.loads(resp.get_data())
        plain_singles = [client.get(f"/predict?{schema.join_key}={i}").json["prediction"]
                         for i in ids[:: len(ids) // 7]]
    assert resp.status_code == 200
    assert cluster_answer["predictions"] == plain_answer["predictions"]  # every entity, exactly
    assert singles == plain_singles
    train = read_record(run["settings"].runs_dir, "train").outputs
    coef = np.array([train["coefficients"][n] for n in schema.feature_names])
    expected = train["intercept"] + latest.to_numpy() @ coef
    assert [p["prediction"] for p in cluster_answer["predictions"]] == pytest.approx(expected, rel=1e-9)


def test_a_cluster_flag_that_does_not_match_the_server_says_what_to_do(run, cluster, tmp_path):
    with redis_single(tmp_path / "plain") as url:
        with pytest.raises(redis.exceptions.ConnectionError, match="unset MLOPS_REDIS_CLUSTER"):
            connect(make_settings(tmp_path, redis_url=url, redis_cluster=True), 1)
    unflagged = make_settings(tmp_path, redis_url=cluster.url())
    with pytest.raises(ConfigError, match="set MLOPS_REDIS_CLUSTER=true"):
        load_latest(connect(unflagged, 10), run["settings"].features_path, schema)
    with pytest.raises(ConfigError, match="database 0"):
        connect(make_settings(tmp_path, redis_url=cluster.url().replace("/0", "/2"), redis_cluster=True), 1)


def test_a_cluster_url_with_another_database_is_one_line_from_the_cli(run, cluster, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("MLOPS_SHARED_DIR", str(run["settings"].shared_dir))
    monkeypatch.setenv("MLOPS_REDIS_URL", cluster.url().replace("/0", "/2"))
    monkeypatch.setenv("MLOPS_REDIS_CLUSTER", "true")
    code = main(["feast", "-q"])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    assert "only database 0" in err and cluster.password not in err


def test_a_slot_moved_to_another_master_is_followed_without_an_error(run, cluster, latest):
    """Resharding: the slot of one entity moves, keys and all, to another master while a
    reader holds the old slot map; its next lookup gets MOVED, follows it, and answers."""
    from pipeline.online import open_online

    layout = FeastRedisLayout(schema)
    entity = 1001
    key = layout.keys([entity])[0]
    slot = key_slot(key)
    online = open_online(run["settings"], schema)
    before = online.lookup([entity, 1002])[0].tolist()
    source = cluster.master_of(slot)
    target = next(port for port in cluster.masters() if port != source)
    ids = {port: cluster.node(port).execute_command("CLUSTER MYID").decode() for port in (source, target)}
    src, dst = cluster.node(source), cluster.node(target)
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
    keys = [k for k in layout.keys([int(i) for i in latest.index]) if key_slot(k) == slot]
    assert src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == len(keys)  # the whole slot moves
    src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "AUTH", cluster.password, "KEYS", *keys)
    for port in cluster.masters():
        cluster.node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
    assert dst.exists(key) and src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
    assert online.lookup([entity, 1002])[0].tolist() == before  # MOVED, followed
    assert online.reader.routes.client.nodes_manager.slots_cache[slot][0].port == target  # the map learnt it
    assert online.lookup([entity])[0].tolist() == before[:1]


def test_a_killed_master_costs_quick_503s_until_its_replica_takes_over(run, cluster, server, figures):
    layout = FeastRedisLayout(schema)
    entity = 1000
    victim = cluster.master_of(key_slot(layout.keys([entity])[0]))
    other = next(e for e in range(1001, 1000 + ROWS // 5)
                 if cluster.master_of(key_slot(layout.keys([e])[0])) != victim)
    status, before, _ = call(f"{server}/predict?{schema.join_key}={entity}")
    assert status == 200
    assert cluster.node(victim).execute_command("WAIT", 1, 5000) >= 1  # its replica has every write

    killed = time.monotonic()
    cluster.kill(victim)
    log: list[tuple[float, int, str, float, int]] = []  # (since kill, status, message, seconds, entity)
    recovered_at = None
    while time.monotonic() - killed < MAX_SECONDS:
        for who in (entity, other):
            status, body, seconds = call(f"{server}/predict?{schema.join_key}={who}")
            log.append((time.monotonic() - killed, status, body.get("message", ""), seconds, who))
            if status == 200 and who == entity:
                assert body["prediction"] == before["prediction"]  # the replica had the data
        if recovered_at is None and any(s == 503 for _, s, _, _, w in log if w == entity) and \
                log[-2][1] == 200:
            recovered_at = log[-2][0]
        if recovered_at is not None and sum(1 for t, _, _, _, _ in log if t > recovered_at) >= 40:
            break
        time.sleep(0.02)

    outage = [row for row in log if row[1] == 503]
    first_503 = next(t for t, s, _, _, w in log if s == 503 and w == entity)
    slowest = max(row[3] for row in log)
    other_ok = sum(1 for t, s, _, _, w in log if w == other and s == 200 and recovered_at and t < recovered_at)
    other_all = sum(1 for t, _, _, _, w in log if w == other and recovered_at and t < recovered_at)
    print(f"\nredis cluster failover: first 503 {first_503:.3f} s after kill -9 of the master, "
          f"first 200 again after {recovered_at} s; slowest answer {slowest * 1000:.0f} ms; "
          f"an entity on another master answered 200 in {other_ok} of {other_all} requests meanwhile")
    figures["redis cluster: first 503 after kill -9 of a master (s)"] = round(first_503, 3)
    figures["redis cluster: first 200 after the kill (replica took over) (s)"] = \
        None if recovered_at is None else round(recovered_at, 3)
    figures["redis cluster: slowest answer during the failover (ms)"] = round(slowest * 1000, 1)
    figures["redis cluster: other master's entity answered 200 during the failover"] = f"{other_ok}/{other_all}"

    assert {row[1] for row in log} <= {200, 503}, {row[1] for row in log}
    assert all("online store unreachable" in row[2] for row in outage)
    assert slowest < SLOW_ANSWER_S  # no request waits out the failover (the socket timeout is 50 ms)
    assert recovered_at is not None and recovered_at < RECOVERY_BOUND_S, log[-5:]
    assert all(s == 200 for t, s, _, _, _ in log if t > recovered_at)  # and stays up
    assert call(f"{server}/readyz")[0] == 200  # the feast stage's marker outlived the failover too
