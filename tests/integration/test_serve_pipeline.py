"""The WSGI app over the real thing: a pipeline run (Feast's SQLite online store,
MLflow's SQLite store), and a Redis that hangs, over a real socket. The routes
and error paths themselves are tested over fakes in tests/service."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pandas as pd
import pytest
from werkzeug.test import Client

from pipeline.dataset import CUSTOMERS as schema
from pipeline.io import read_record
from pipeline.online import open_online
from pipeline.metrics import Metrics
from pipeline.serve import create_app
from tests.service.fakes import (SAMPLE, FakeClock, Fakes, documented_families, exposed_families,
                                 metrics_in_memory)
from tests.support import make_settings

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _metrics_in_memory(monkeypatch):
    metrics_in_memory(monkeypatch)


@pytest.fixture(scope="module")
def client(sqlite_pipeline):
    return Client(create_app(sqlite_pipeline, watch=False))


@pytest.fixture(scope="module")
def expected(sqlite_pipeline):
    """Predictions computed independently: latest Parquet row per entity x coefficients."""
    feats = pd.read_parquet(sqlite_pipeline.features_path)
    latest = feats.sort_values(schema.timestamp).groupby(schema.join_key).last()[list(schema.feature_names)]
    train = read_record(sqlite_pipeline.runs_dir, "train").outputs
    coef = np.array([train["coefficients"][n] for n in schema.feature_names])
    pred = train["intercept"] + latest.to_numpy() @ coef
    return dict(zip(latest.index, pred)), latest


def body(resp):
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    return json.loads(resp.get_data())


def test_get_predict_without_arguments_answers_for_the_sample_entity(client, expected):
    resp = client.get("/predict")
    assert resp.status_code == 200
    data = body(resp)
    assert data[schema.join_key] == 1000
    assert data["prediction"] == pytest.approx(expected[0][1000], rel=1e-9)
    assert data["model"] == {"name": "mlops-linear", "version": 1, "alias": "production"}
    assert data["features"] == pytest.approx(expected[1].loc[1000].to_dict())


def test_get_with_a_query_and_post_single_agree(client, expected):
    got = body(client.get(f"/predict?{schema.join_key}=1007"))
    posted = body(client.post("/predict", json={schema.join_key: 1007}))
    assert got["prediction"] == posted["prediction"] == pytest.approx(expected[0][1007], rel=1e-9)


def test_batch_form_keeps_the_order(client, expected):
    ids = [1010, 1003, 1599]
    data = body(client.post("/predict", json={"instances": [{schema.join_key: i} for i in ids]}))
    assert [p[schema.join_key] for p in data["predictions"]] == ids
    assert [p["prediction"] for p in data["predictions"]] == pytest.approx([expected[0][i] for i in ids])
    assert data["model"]["version"] == 1


def test_unknown_entities_and_probes_against_the_real_stores(client):
    assert client.post("/predict", json={schema.join_key: 42}).status_code == 404
    resp = client.post("/predict", json={"instances": [{schema.join_key: 1000}, {schema.join_key: 5}]})
    assert resp.status_code == 404 and "customer_id 5" in body(resp)["message"]
    ready = client.get("/readyz")
    assert ready.status_code == 200 and body(ready)["model_version"] == 1
    assert body(ready)["online_store"] == "sqlite: present"  # words, no path (the path is in the log)


def test_metrics_count_requests_by_route_and_status(client):
    client.get("/predict")
    client.post("/predict", json={schema.join_key: 42})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'mlops_http_requests_total{method="GET",route="/predict",status="200"}' in text
    assert 'mlops_http_requests_total{method="POST",route="/predict",status="404"}' in text
    assert "mlops_http_request_duration_seconds_bucket" in text
    assert "mlops_online_lookup_duration_seconds_count" in text
    assert "mlops_model_version 1.0" in text
    assert exposed_families(text) == documented_families()


def test_no_model_yet_is_a_503_that_says_what_to_run(tmp_path):
    settings = make_settings(tmp_path)
    settings.feast_dir.mkdir(parents=True)
    app = create_app(settings, watch=False)
    resp = Client(app).get("/predict")
    assert resp.status_code == 503 and "python -m pipeline run" in body(resp)["message"]
    assert Client(app).get("/readyz").status_code == 503
    assert Client(app).get("/healthz").status_code == 200


@pytest.fixture
def silent_redis():
    """A TCP port that accepts connections and never answers: a hung Redis."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"


def hung_store_app(tmp_path, url: str, **settings):
    """The app over the real Redis reader on a hung Redis; the model from the fakes."""
    fakes = Fakes(make_settings(tmp_path, redis_url=url, **settings))
    metrics, clock = Metrics(), FakeClock()
    online = open_online(fakes.settings, schema, clock=clock, on_read=metrics.looked_up,
                         on_unreachable=metrics.lookup_errors.inc)
    app = create_app(fakes.settings, online=online, watcher=fakes.watcher, metrics=metrics,
                     sample_entity=SAMPLE)
    return Client(app), clock


def test_unreachable_online_store_is_a_fast_503(tmp_path, silent_redis):
    client, _ = hung_store_app(tmp_path, silent_redis, online_timeout_seconds=0.1)
    for _ in range(3):
        started = time.monotonic()
        resp = client.get("/predict")
        elapsed = time.monotonic() - started
        assert resp.status_code == 503, body(resp)
        assert "online store unreachable" in body(resp)["message"]
        # one socket timeout, no retries with back-off (redis-py's default would take seconds)
        assert elapsed < 1.0
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    assert "mlops_online_lookup_errors_total 3.0" in client.get("/metrics").get_data(as_text=True)


def test_a_hung_store_costs_one_timeout_per_back_off_not_one_per_request(tmp_path, silent_redis):
    client, clock = hung_store_app(tmp_path, silent_redis, online_timeout_seconds=0.2,
                                   online_backoff_seconds=0.6)
    took = []
    for _ in range(5):
        started = time.monotonic()
        assert client.get("/predict").status_code == 503
        took.append(time.monotonic() - started)
    # the first two lookups wait for the socket timeout (one late answer alone is not
    # "down": MLOPS_ONLINE_FAILURES_BEFORE_BACKOFF is 2)...
    assert min(took[:2]) >= 0.2
    assert max(took[2:]) < 0.1  # ...the next ones, inside the back-off, answer at once
    clock.advance(0.6)
    started = time.monotonic()
    assert client.get("/predict").status_code == 503
    assert time.monotonic() - started >= 0.2  # after the back-off, the store is tried again
