"""``rediss://``: the whole pipeline and /predict against a real Redis that speaks
only TLS (Debian's redis-server, on a loopback port, with a certificate made here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.request

import pytest

from tests.support import clean_env, free_port, pipeline_cli, running_server, stop, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server and openssl are needed (.ci/run installs Debian's redis-server)")
        pytest.skip("needs Debian's redis-server and openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "redis.crt", folder / "redis.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port, password = free_port(), "tls-test-pw"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--tls-auth-clients", "no", "--requirepass", password, "--save", "",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password=password, ssl=True, ssl_ca_certs=str(cert))

    def answers() -> bool:
        with contextlib.suppress(redis.exceptions.ConnectionError):
            return client.ping()
        return False

    try:
        wait_until(answers, 20, "the TLS Redis to answer")
        yield f"rediss://:{password}@127.0.0.1:{port}/0", cert
    finally:
        stop(proc)


def test_the_pipeline_and_predict_run_over_tls(tls_redis, tmp_path):
    url, cert = tls_redis
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_ROWS="2000", MLOPS_REDIS_URL=url,
                    MLOPS_REDIS_CA_FILE=str(cert))
    pipeline_cli(["run"], env)
    assert "redis" in (tmp_path / "feast" / "feature_store.yaml").read_text()
    assert "tls-test-pw" not in (tmp_path / "feast" / "feature_store.yaml").read_text()
    with running_server(env, workers=1) as base:
        with urllib.request.urlopen(f"{base}/predict", timeout=5) as resp:
            assert resp.status == 200


def test_plain_redis_against_a_tls_port_is_one_line(tls_redis, tmp_path):
    url, cert = tls_redis
    plain = url.replace("rediss://", "redis://")
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_ROWS="200", MLOPS_REDIS_URL=plain)
    proc = pipeline_cli(["run"], env, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "tls-test-pw" not in proc.stderr + proc.stdout
