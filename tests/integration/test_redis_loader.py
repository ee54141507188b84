"""The feast stage loads Redis with its own writer (pipeline/redis_loader.py)
instead of ``feast materialize``: these tests hold it to Feast, byte for byte
against what ``feast materialize`` writes and value for value through Feast's
own ``get_online_features``, on a real Redis and on a real Redis Cluster
(3 masters, 3 replicas of Debian's redis-server)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis

from pipeline.dataset import CUSTOMERS as schema
from pipeline.feast import definitions, online_features, open_store
from pipeline.redis_layout import FeastRedisLayout, LayoutChanged, connect
from pipeline.redis_loader import latest_rows, load_latest
from tests.cluster_support import cluster_or_skip
from tests.conftest import clean_env, make_settings, pipeline_cli
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.docker]

ROWS, SEED = 3000, 5


def db_url(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> dict:
    """Features Parquet from the real stages, rows shuffled so that file order
    is not time order (each entity has several events)."""
    shared = tmp_path_factory.mktemp("shared-loader")
    env = clean_env(MLOPS_SHARED_DIR=str(shared), MLOPS_ROWS=str(ROWS), MLOPS_SEED=str(SEED))
    for stage in ("ingest", "features"):
        pipeline_cli([stage, "-q"], env)
    settings = make_settings(shared, rows=ROWS, seed=SEED)
    frame = pd.read_parquet(settings.features_path)
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    path = shared / "shuffled.parquet"
    shuffled.to_parquet(path, index=False)
    return {"shared": shared, "path": path, "frame": shuffled}


def store_on(shared, url: str, path, **options):
    settings = make_settings(shared, redis_url=url, **options)
    store = open_store(settings)
    store.apply(definitions(path, schema))
    return settings, store


def dump(client: redis.Redis) -> dict[bytes, dict[bytes, bytes]]:
    return {key: client.hgetall(key) for key in client.scan_iter(count=1000)}


def test_the_loader_writes_the_bytes_feast_materialize_writes(features, redis_url):
    materialized_url, loaded_url = db_url(redis_url, 3), db_url(redis_url, 4)
    settings, store = store_on(features["shared"] / "m", materialized_url, features["path"])
    frame = features["frame"]
    start = frame[schema.timestamp].min().to_pydatetime()
    end = (frame[schema.timestamp].max() + timedelta(seconds=1)).to_pydatetime()
    store.materialize(start_date=start, end_date=end, feature_views=[schema.feature_view])
    written = load_latest(connect(make_settings(features["shared"], redis_url=loaded_url), 10),
                          features["path"], schema)

    theirs = dump(connect(settings, 10))
    ours = dump(connect(make_settings(features["shared"], redis_url=loaded_url), 10))
    assert written == frame[schema.join_key].nunique() == len(theirs)
    assert ours == theirs  # every key, every field (the _ts field included), every byte


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from cluster_or_skip(tmp_path_factory.mktemp("loader-cluster"))


def dump_masters(cluster) -> dict[int, dict[bytes, dict[bytes, bytes]]]:
    """Every hash on every master, by master: where each key lives, and its bytes."""
    return {port: dump(cluster.node(port)) for port in cluster.masters()}


def test_on_a_cluster_the_loader_writes_the_bytes_feast_materialize_writes(features, cluster):
    settings, store = store_on(features["shared"] / "cm", cluster.url(), features["path"], redis_cluster=True)
    frame = features["frame"]
    start = frame[schema.timestamp].min().to_pydatetime()
    end = (frame[schema.timestamp].max() + timedelta(seconds=1)).to_pydatetime()
    store.materialize(start_date=start, end_date=end, feature_views=[schema.feature_view])  # Feast's RedisCluster
    theirs = dump_masters(cluster)
    for port in theirs:
        cluster.node(port).flushall()
    assert sum(len(keys) for keys in dump_masters(cluster).values()) == 0
    written = load_latest(connect(settings, 10), features["path"], schema)
    ours = dump_masters(cluster)
    assert written == frame[schema.join_key].nunique() == sum(len(keys) for keys in theirs.values())
    assert all(len(keys) > written // 6 for keys in theirs.values())  # spread over the 3 masters
    assert ours == theirs  # every key on the same master, every field, every byte


def test_feast_sdk_reads_back_the_latest_row_of_every_entity(features, redis_url):
    url = db_url(redis_url, 5)
    settings, store = store_on(features["shared"] / "sdk", url, features["path"])
    load_latest(connect(settings, 10), features["path"], schema)
    frame = features["frame"]
    latest = frame.sort_values(schema.timestamp).groupby(schema.join_key).last()
    ids = [int(i) for i in latest.index] + [10**12]
    values = online_features(store, schema, ids)
    for name in schema.feature_names:
        got = np.array(values[name][:-1], dtype=float)
        assert np.array_equal(got, latest[name].to_numpy()), name  # exactly, not approximately
        assert values[name][-1] is None  # an entity never loaded stays unknown


def test_latest_rows_picks_the_newest_event_and_on_a_tie_the_later_row(tmp_path):
    t0 = pd.Timestamp("2026-01-01T00:00:00Z")
    frame = pd.DataFrame({
        schema.join_key: [7, 8, 7, 8, 7],
        schema.timestamp: [t0 + timedelta(hours=h) for h in (2, 1, 0, 1, 1)],
        **{name: [float(i) for i in range(5)] for name in schema.feature_names},
    })
    path = tmp_path / "f.parquet"
    frame.to_parquet(path, index=False)
    assert latest_rows(path, schema).tolist() == [True, False, False, True, False]
    assert pq.read_table(path).num_rows == 5


def test_a_changed_feast_encoding_is_refused_with_what_to_do(monkeypatch):
    from feast.infra.online_stores import helpers

    real = helpers._redis_key
    monkeypatch.setattr(helpers, "_redis_key", lambda project, key, **kw: real(project, key, **kw) + b"!")
    with pytest.raises(LayoutChanged, match="pin the Feast version"):
        FeastRedisLayout(schema)


def test_a_string_keyed_data_set_gets_a_layout():
    """String keys (tests/data/housing) are built by Feast's own helper: the start-up
    check must pass for them too, or serve refuses to start on a user's data set."""
    from pipeline.dataset import load

    housing = load(ROOT / "tests" / "data" / "housing" / "housing.yaml").schema("string")  # as ingest finds it
    assert not housing.int_keys
    layout = FeastRedisLayout(housing)
    assert layout.keys(["H-007"]) == [layout.feast_key("H-007")]


def test_the_reader_survives_redis_closing_its_idle_connection(features, redis_url):
    """Redis's `timeout`, a restart or a proxy closes idle connections; the next
    lookup must not be a 503 while Redis is fine."""
    from pipeline.online import RedisOnlineReader

    settings = make_settings(features["shared"], redis_url=db_url(redis_url, 6))
    load_latest(connect(settings, 10), features["path"], schema)
    reader = RedisOnlineReader(connect(settings, 1), schema)
    entity = int(features["frame"][schema.join_key].iloc[0])
    before = reader.read([entity])
    admin = connect(settings, 10)
    assert admin.client_kill_filter(_type="normal", skipme=True) >= 1  # the reader's connection
    assert reader.read([entity]) == before and before[0] is not None
