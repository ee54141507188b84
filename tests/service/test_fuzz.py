"""Property-based tests of request parsing (hypothesis): whatever arrives, the
answer is a JSON 4xx that says what is wrong, or a correct prediction; never a 5xx.
The app runs over the in-memory fakes (tests/service/fakes.py)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import Client

from pipeline.dataset import CUSTOMERS as schema
from pipeline.api import parse_body
from pipeline.errors import BadRequest, UnprocessableEntity
from pipeline.schema import ENTITY_ID_MAX
from tests.support import make_settings
from tests.service.fakes import ENTITIES, Fakes

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
COUNTS = {"inputs": 0, "5xx": 0}

# Strings of digits: entity keys as text, from short ones to past Python's
# int-from-text limit (4300 digits), with the padding and signs users add.
digit_strings = st.one_of(
    st.text(alphabet="0123456789", min_size=1, max_size=30),
    st.integers(min_value=19, max_value=9000).map(lambda n: "9" * n),
    st.integers(min_value=4290, max_value=4400).flatmap(
        lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)),
    st.tuples(st.sampled_from(["", " ", "+", "-", "0" * 5000, "\t"]),
              st.text(alphabet="0123456789", min_size=1, max_size=25),
              st.sampled_from(["", " ", "\n", ".0", "e3"])).map("".join),
)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.text(max_size=20), digit_strings,
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=30)
bodies = st.one_of(
    st.binary(max_size=2000),
    json_value.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.dictionaries(st.sampled_from([schema.join_key, "instances", "x"]), json_value, max_size=3)
    .map(lambda d: json.dumps(d, allow_nan=True).encode()),
    st.integers(min_value=1, max_value=3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(min_value=1, max_value=3000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.just(b'{"customer_id": ' + b"9" * 5000 + b"}"),
    digit_strings.map(lambda d: json.dumps({schema.join_key: d}).encode()),
    digit_strings.map(lambda d: json.dumps({"instances": [{schema.join_key: d}]}).encode()),
    st.just(b" " * 70_000),
)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    return Fakes(make_settings(tmp_path_factory.mktemp("fuzz")))


@pytest.fixture(scope="module")
def client(fakes):
    return Client(fakes.app)


@pytest.fixture(scope="module", autouse=True)
def report(figures):
    yield
    figures["fuzz: request bodies and queries tried (hypothesis)"] = COUNTS["inputs"]


def check(resp) -> dict:
    COUNTS["inputs"] += 1
    if resp.status_code >= 500:
        COUNTS["5xx"] += 1
    assert resp.status_code in (200, 400, 404, 413, 422), resp.get_data()[:300]
    assert resp.headers["Content-Type"].startswith("application/json")
    data = json.loads(resp.get_data())
    if resp.status_code != 200:
        assert data["status"] == resp.status_code and data["message"]
    return data


@FUZZ
@given(body=bodies)
def test_any_body_gets_a_json_4xx_or_a_prediction(client, body):
    data = check(client.post("/predict", data=body, content_type="application/json"))
    if "prediction" in data:
        assert math.isfinite(data["prediction"])


@FUZZ
@given(query=st.one_of(st.text(max_size=60), digit_strings))
def test_any_query_value_gets_a_json_4xx_or_a_prediction(client, query):
    check(client.get("/predict", query_string={schema.join_key: query}))


@FUZZ
@given(digits=digit_strings)
def test_a_key_given_as_a_string_of_digits_is_a_4xx_or_that_entity(client, fakes, digits):
    """However many digits (past Python's 4300-digit limit too), in a query or in JSON."""
    for resp in (client.get("/predict", query_string={schema.join_key: digits}),
                 client.post("/predict", json={schema.join_key: digits})):
        data = check(resp)
        if resp.status_code == 200:
            assert data[schema.join_key] == int(digits.strip().lstrip("0") or "0")
        else:
            assert resp.status_code in (404, 422), data


@FUZZ
@given(entity=st.integers(min_value=ENTITIES.start, max_value=ENTITIES.stop - 1))
def test_every_known_entity_is_predicted_the_same_way_by_get_and_post(client, fakes, entity):
    got = check(client.get(f"/predict?{schema.join_key}={entity}"))
    posted = check(client.post("/predict", json={"instances": [{schema.join_key: entity}]}))
    assert got["prediction"] == posted["predictions"][0]["prediction"]
    assert got["prediction"] == pytest.approx(fakes.expected(entity), rel=1e-9)
    assert got[schema.join_key] == entity


@settings(max_examples=300, deadline=None)
@given(body=bodies)
def test_parse_body_raises_only_domain_errors(body):
    try:
        ids, batch = parse_body(body, 1000, schema)
    except (BadRequest, UnprocessableEntity) as exc:
        assert exc.message
        return
    assert ids and all(isinstance(i, int) and 0 <= i <= ENTITY_ID_MAX for i in ids)
    assert batch == (len(ids) != 1 or b"instances" in body)
