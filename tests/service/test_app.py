"""Every route and error path of the WSGI app, through werkzeug's test client,
over in-memory fakes of the online store and the registry (tests/service/fakes.py):
the real app, back-off and model watcher, in milliseconds. The same app against
a real pipeline run is tests/integration/test_serve_pipeline.py."""

from __future__ import annotations

import json

import pytest
from werkzeug.test import Client

from pipeline.dataset import CUSTOMERS as schema
from tests.support import make_settings
from tests.service.fakes import SAMPLE, Fakes, TinyModel, documented_families, exposed_families


@pytest.fixture
def fakes(tmp_path):
    return Fakes(make_settings(tmp_path))


@pytest.fixture
def client(fakes):
    return Client(fakes.app)


def body(resp):
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    return json.loads(resp.get_data())


def test_get_predict_without_arguments_answers_for_the_sample_entity(client, fakes):
    resp = client.get("/predict")
    assert resp.status_code == 200
    data = body(resp)
    assert data[schema.join_key] == SAMPLE
    assert data["prediction"] == pytest.approx(fakes.expected(SAMPLE), rel=1e-9)
    assert data["model"] == {"name": "mlops-linear", "version": 1, "alias": "production"}
    assert data["features"] == dict(zip(schema.feature_names, fakes.reader.rows[SAMPLE]))


def test_get_with_a_query_and_post_single_agree(client, fakes):
    got = body(client.get(f"/predict?{schema.join_key}=1007"))
    posted = body(client.post("/predict", json={schema.join_key: 1007}))
    assert got["prediction"] == posted["prediction"] == pytest.approx(fakes.expected(1007), rel=1e-9)


def test_batch_form_keeps_the_order(client, fakes):
    ids = [1010, 1003, 1599]
    data = body(client.post("/predict", json={"instances": [{schema.join_key: i} for i in ids]}))
    assert [p[schema.join_key] for p in data["predictions"]] == ids
    assert [p["prediction"] for p in data["predictions"]] == pytest.approx([fakes.expected(i) for i in ids])
    assert data["model"]["version"] == 1
    assert fakes.reader.reads == 1  # one lookup for the whole batch


@pytest.mark.parametrize("request_kwargs, status, words", [
    ({"json": {schema.join_key: 42}}, 404, "no features in the online store"),
    ({"json": {"instances": [{schema.join_key: 1000}, {schema.join_key: 5}]}}, 404, "customer_id 5"),
    ({"data": "{not json", "content_type": "application/json"}, 400, "not valid JSON"),
    ({"data": '{"customer_id": NaN}'}, 400, "not valid JSON"),
    ({"data": "[" * 100_00 + "]" * 100_00}, 400, "not valid JSON"),
    ({"json": {schema.join_key: "abc"}}, 422, "must be an integer"),
    ({"json": {schema.join_key: 1.5}}, 422, "must be an integer"),
    ({"json": {schema.join_key: True}}, 422, "must be an integer"),
    ({"json": {schema.join_key: 2**70}}, 422, "between 0 and"),
    ({"json": {schema.join_key: -1}}, 422, "between 0 and"),
    ({"json": [1000]}, 422, "JSON object"),
    ({"json": {"colour": 1}}, 422, "unexpected keys"),
    ({"json": {"instances": []}}, 422, "non-empty list"),
    ({"json": {"instances": [{schema.join_key: 1000}] * 1001}}, 422, "at most 1000"),
    ({"data": b'{"customer_id": ' + b" " * 70_000 + b"1}"}, 413, "over 65536 bytes"),
])
def test_bad_requests_get_json_errors_that_say_what_is_wrong(client, request_kwargs, status, words):
    resp = client.post("/predict", **request_kwargs)
    assert resp.status_code == status
    data = body(resp)
    assert data["status"] == status and words in data["message"]


@pytest.mark.parametrize("query, status", [("customer_id=x", 422), ("customer_id=1&customer_id=2", 422),
                                           ("colour=red", 422), ("customer_id=1", 404)])
def test_bad_queries(client, query, status):
    resp = client.get(f"/predict?{query}")
    assert resp.status_code == status and body(resp)["status"] == status


def test_unknown_route_and_method_are_json(client):
    assert body(client.get("/nope"))["status"] == 404
    resp = client.delete("/predict")
    assert resp.status_code == 405 and body(resp)["status"] == 405
    assert "GET" in resp.headers["Allow"]


def test_probes(client):
    assert body(client.get("/healthz")) == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and body(ready)["model_version"] == 1


def test_metrics_count_requests_by_route_and_status(client, fakes):
    client.get("/predict")
    client.post("/predict", json={schema.join_key: 42})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'mlops_http_requests_total{method="GET",route="/predict",status="200"} 1.0' in text
    assert 'mlops_http_requests_total{method="POST",route="/predict",status="404"} 1.0' in text
    assert 'mlops_http_request_duration_seconds_count{route="/predict"} 2.0' in text
    assert "mlops_http_request_duration_seconds_bucket" in text
    assert f"mlops_online_lookup_duration_seconds_count {fakes.reader.reads:.1f}" in text
    assert fakes.reader.reads == 2
    assert "mlops_predictions_total 1.0" in text  # the 404 predicted nothing
    assert "mlops_model_version 1.0" in text
    assert 'mlops_model_loads_total{outcome="ok"} 1.0' in text


def test_metrics_are_exactly_the_documented_families(client):
    client.get("/predict")
    families = exposed_families(client.get("/metrics").get_data(as_text=True))
    assert not {f for f in families if f.startswith("feast_")}
    assert families == documented_families()
    assert len(families) == 8


def test_no_model_yet_is_a_503_that_says_what_to_run(tmp_path):
    fakes = Fakes(make_settings(tmp_path), alias=None)
    client = Client(fakes.app)
    resp = client.get("/predict")
    assert resp.status_code == 503 and "python -m pipeline run" in body(resp)["message"]
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving(client, fakes):
    fakes.registry.versions[2] = TinyModel(feature_names=["something", "else"])
    fakes.registry.alias = 2
    assert fakes.watcher.refresh() is False
    assert body(client.get("/predict"))["model"]["version"] == 1
    ready = body(client.get("/readyz"))
    assert ready["ready"] and ready["model_error"] == ("version 2 expects other features than the online store "
                                                       "serves; still serving 1")
    assert fakes.watcher.refresh() is False and fakes.registry.loads == 2  # not before its back-off
    fakes.registry.versions[3] = TinyModel(intercept=1.0, coefficients=[0.0] * len(schema.feature_names))
    fakes.registry.alias = 3
    assert fakes.watcher.refresh() is True
    after = body(client.get("/predict"))
    assert after["model"]["version"] == 3 and after["prediction"] == pytest.approx(1.0)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'mlops_model_loads_total{outcome="failed"} 1.0' in text and "mlops_model_version 3.0" in text
    assert 'mlops_model_loads_total{outcome="ok"} 2.0' in text
    assert "model_error" not in body(client.get("/readyz"))


class Flaky:
    """A registry whose version 2 fails to load until its artifacts come back."""

    def __init__(self, registry) -> None:
        self.registry, self.broken, self.attempts = registry, True, 0

    def load(self, name, version, alias, uri):
        if version == 2:
            self.attempts += 1
            if self.broken:
                raise OSError("No such file or directory: '/volume/mlflow/artifacts/abc/weights.json'")
        return self.registry.load(name, version, alias, uri)


def test_a_version_that_failed_to_load_is_tried_again_with_back_off(tmp_path):
    fakes = Fakes(make_settings(tmp_path, model_poll_seconds=5.0))
    flaky = Flaky(fakes.registry)
    fakes.watcher.loader = flaky.load
    fakes.registry.versions[2] = TinyModel(intercept=-4.0)
    fakes.registry.alias = 2
    client = Client(fakes.app)
    tried_at = []
    for _ in range(40):  # 40 polls of 5 s on the fake clock: 200 s
        if fakes.watcher.refresh():
            break
        tried_at.append(flaky.attempts)
        fakes.clock.advance(5.0)
        if fakes.clock() > 1000.0 + 100:
            flaky.broken = False  # the artifacts came back
    # tried after 0, 5, 15, 35, 75 s (back-off doubling from the poll period), then loaded at 155 s
    assert sorted(set(tried_at)) == [1, 2, 3, 4, 5] and flaky.attempts == 6
    assert body(client.get("/predict"))["model"]["version"] == 2
    ready = body(client.get("/readyz"))
    assert ready["ready"] and "model_error" not in ready
    text = client.get("/metrics").get_data(as_text=True)
    assert 'mlops_model_loads_total{outcome="failed"} 5.0' in text


def test_a_stale_model_error_clears_when_the_alias_moves_back(client, fakes):
    fakes.registry.versions[2] = TinyModel(feature_names=["x"])
    fakes.registry.alias = 2
    assert fakes.watcher.refresh() is False and "model_error" in body(client.get("/readyz"))
    fakes.registry.alias = 1  # rolled back to the version being served
    assert fakes.watcher.refresh() is False
    assert "model_error" not in body(client.get("/readyz"))


def test_model_errors_in_readyz_are_words_not_paths_or_exception_text(tmp_path):
    fakes = Fakes(make_settings(tmp_path))
    fakes.watcher.loader = Flaky(fakes.registry).load
    fakes.registry.versions[2] = TinyModel()
    fakes.registry.alias = 2
    fakes.watcher.refresh()
    error = body(Client(fakes.app).get("/readyz"))["model_error"]
    assert error == "version 2 could not be loaded; still serving 1"


def test_unreachable_online_store_is_a_503(client, fakes):
    fakes.reader.failure = TimeoutError("timed out")
    for _ in range(3):
        resp = client.get("/predict")
        assert resp.status_code == 503, body(resp)
        assert "online store unreachable" in body(resp)["message"]
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    assert "mlops_online_lookup_errors_total 3.0" in client.get("/metrics").get_data(as_text=True)


def test_a_failing_store_is_tried_once_per_back_off_not_once_per_request(client, fakes):
    backoff = fakes.settings.online_backoff_seconds
    fakes.reader.failure = ConnectionError("refused")
    for _ in range(5):
        assert client.get("/predict").status_code == 503
    assert fakes.reader.reads == 1  # the first lookup tried the store; the next four failed fast
    fakes.clock.advance(backoff * 0.9)
    assert client.get("/predict").status_code == 503 and fakes.reader.reads == 1
    fakes.clock.advance(backoff * 0.2)
    assert client.get("/predict").status_code == 503 and fakes.reader.reads == 2  # tried again
    fakes.reader.failure = None
    assert client.get("/predict").status_code == 503  # still inside the new back-off
    fakes.clock.advance(backoff * 1.1)
    assert client.get("/predict").status_code == 200 and fakes.reader.reads == 3


def test_a_store_error_that_is_not_unreachability_is_a_500_not_a_back_off(client, fakes):
    fakes.reader.failure = KeyError("a bug")
    resp = client.get("/predict")
    assert resp.status_code == 500 and body(resp)["message"] == "internal error; see the server log"
    fakes.reader.failure = None
    assert client.get("/predict").status_code == 200


def test_the_watcher_polls_on_its_clock_and_swaps_the_model(tmp_path):
    fakes = Fakes(make_settings(tmp_path, model_poll_seconds=5.0), watch=True)
    try:
        clock, registry, client = fakes.clock, fakes.registry, Client(fakes.app)
        clock.until(lambda: clock.waiting == 1)  # started: checked once, now pausing
        assert registry.loads == 1
        registry.versions[2] = TinyModel(intercept=-4.0)
        registry.alias = 2
        clock.advance(4.9)
        assert clock.waiting == 1 and fakes.watcher.current.version == 1  # not yet time to poll
        clock.advance(0.1)
        clock.until(lambda: registry.loads == 2 and clock.waiting == 1)
        data = body(client.get("/predict"))
        assert data["model"]["version"] == 2 and data["prediction"] == pytest.approx(fakes.expected(SAMPLE, 2))
        polls = registry.resolves
        clock.advance(5.0)  # the alias did not move: checked again, nothing loaded
        clock.until(lambda: registry.resolves == polls + 1 and clock.waiting == 1)
        assert registry.loads == 2
    finally:
        fakes.watcher.stop()


def chunked_post(client, payload: bytes):
    """A POST as a WSGI server hands on a chunked body: no Content-Length, the chunks taken apart."""
    import io

    return client.open("/predict", method="POST", input_stream=io.BytesIO(payload),
                       headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"})


def test_a_chunked_body_is_read_whole_with_the_same_limit(client, fakes):
    data = body(chunked_post(client, json.dumps({schema.join_key: 1007}).encode()))
    assert data["prediction"] == pytest.approx(fakes.expected(1007), rel=1e-9)
    resp = chunked_post(client, b'{"customer_id": ' + b" " * 70_000 + b"1007}")
    assert resp.status_code == 413 and "over 65536 bytes" in body(resp)["message"]


def test_one_late_answer_fails_that_request_only(client, fakes):
    fakes.reader.failure = TimeoutError("Timeout reading from 10.1.2.3:6379")
    resp = client.get("/predict")
    assert resp.status_code == 503
    assert body(resp)["message"] == "online store unreachable (no answer in time); retry shortly"
    fakes.reader.failure = None
    assert client.get("/predict").status_code == 200  # tried again at once: no back-off for one slow read
    assert fakes.reader.reads == 2


def test_late_answers_in_a_row_back_off(client, fakes):
    backoff = fakes.settings.online_backoff_seconds
    fakes.reader.failure = TimeoutError("timed out")
    assert client.get("/predict").status_code == 503
    fakes.reader.failure = None
    assert client.get("/predict").status_code == 200  # the count starts again after an answer
    fakes.reader.failure = TimeoutError("timed out")
    assert [client.get("/predict").status_code for _ in range(2)] == [503, 503]
    fakes.reader.failure = None
    assert client.get("/predict").status_code == 503 and fakes.reader.reads == 4  # backing off: not tried
    fakes.clock.advance(backoff * 1.1)
    assert client.get("/predict").status_code == 200 and fakes.reader.reads == 5


def test_requests_that_waited_behind_a_late_answer_fail_at_once(client, fakes):
    """They already waited out one timeout; they are not made to wait out another."""
    arrived = fakes.clock()
    fakes.clock.advance(0.05)
    fakes.reader.failure = TimeoutError("timed out")
    assert client.get("/predict").status_code == 503 and fakes.reader.reads == 1
    fakes.reader.failure = None
    queued = client.get("/predict", environ_overrides={"mlops.arrived": arrived})
    assert queued.status_code == 503 and fakes.reader.reads == 1  # not tried
    later = client.get("/predict", environ_overrides={"mlops.arrived": fakes.clock()})
    assert later.status_code == 200 and fakes.reader.reads == 2


def test_503_bodies_and_readyz_name_no_address_and_no_exception_text(client, fakes):
    fakes.reader.failure = ConnectionError("Error 111 connecting to redis.internal:6379. Connection refused.")
    texts = [client.get("/predict").get_data(as_text=True), client.get("/readyz").get_data(as_text=True)]
    for text in texts:
        assert "6379" not in text and "redis.internal" not in text and "Error 111" not in text, text
    assert body(client.get("/predict"))["message"].startswith("online store unreachable (")


def test_the_redis_reader_words_its_failures_without_the_address():
    import redis

    from pipeline.online import OnlineFeatures, RedisOnlineReader
    from tests.support import free_port

    port = free_port()  # nothing listens there: refused
    reader = RedisOnlineReader(redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.05,
                                           socket_connect_timeout=0.05, retry=None), schema)
    assert reader.reachable() == (False, "redis: unreachable (see the server log)")
    online = OnlineFeatures(reader, schema, 0.25)
    with pytest.raises(Exception) as caught:
        online.lookup([1000])
    assert caught.value.message == "online store unreachable (cannot connect); retry shortly"
    assert str(port) not in caught.value.message
