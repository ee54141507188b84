"""schemathesis against the live server (granian over a socket): every
operation of /openapi.json, positive and negative examples, bounded in number.
No 5xx, every response matching the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from pipeline.settings import Settings
from tests.conftest import clean_env, running_server
from tests.service.fakes import documented_families, exposed_families

pytestmark = pytest.mark.integration
COUNTS = {"inputs": 0, "5xx": 0}


@pytest.fixture(scope="module")
def live_server(sqlite_pipeline):
    with running_server(clean_env(MLOPS_SHARED_DIR=str(sqlite_pipeline.shared))) as base:
        yield base


@pytest.fixture(scope="module")
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server}/openapi.json")


@pytest.fixture(scope="module", autouse=True)
def report(figures):
    yield
    figures["schemathesis: requests against the live server"] = COUNTS["inputs"]


MAX_BODY_BYTES = Settings.model_fields["max_body_bytes"].default  # the live server's limit

OPERATIONS = ["GET /predict", "POST /predict", "GET /healthz", "GET /readyz", "GET /metrics"]


# negative cases need inputs to break: the routes without parameters have none
CASES = [(op, "positive") for op in OPERATIONS] + [(op, "negative") for op in OPERATIONS[:2]]


@pytest.mark.parametrize("label, mode", CASES)
def test_api_conforms_to_its_openapi_description(api_schema, label, mode):
    """Drive each operation with schemathesis's generated cases (bounded), then
    its own checks: no server error, status codes, content types and bodies
    as documented; in negative mode, invalid input must be refused with a 4xx."""
    from hypothesis import given
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import negative_data_rejection

    operations = {op.label: op for op in (r.ok() for r in api_schema.get_all_operations())}
    assert set(operations) == set(OPERATIONS)  # the description covers every route
    operation = operations[label]
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE

    @given(case=operation.as_strategy(generation_mode=generation))
    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(timeout=10)
        COUNTS["inputs"] += 1
        if response.status_code >= 500:
            COUNTS["5xx"] += 1
        assert response.status_code < 500, response.text[:300]
        if response.status_code == 413:
            # A body over the size limit is refused by its size before its items are
            # counted: the documented 413, which schemathesis's list of "rejected"
            # statuses lacks. Every other check still applies.
            assert len(response.request.body or b"") > MAX_BODY_BYTES, response.text[:300]
            case.validate_response(response, excluded_checks=[negative_data_rejection])
            return
        case.validate_response(response)

    run()


def test_metrics_of_a_two_worker_server_are_exactly_the_documented_families(live_server):
    """Feast's own metrics (always zero here) land in the workers' shared
    prometheus folder: /metrics must still carry only the service's families."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{live_server}/predict", timeout=10) as resp:
        assert resp.status == 200
    with opener.open(f"{live_server}/metrics", timeout=10) as resp:
        families = exposed_families(resp.read().decode())
    assert not {f for f in families if f.startswith("feast_")}
    assert families == documented_families()
