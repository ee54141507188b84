"""The app behind granian over real sockets (the fakes' app, served the way
``python -m pipeline serve`` serves the real one: tests/service/served.py):
request bodies in every framing a client may use, and which errors come
from granian's HTTP layer rather than the app (docs/api.md lists them)."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from pipeline.dataset import CUSTOMERS as schema
from tests.service.served import serving


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("socket"), workers=1, MLOPS_BODY_TIMEOUT_SECONDS="1") as url:
        yield url


def exchange(base: str, raw: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one response: ``(status, headers, body)``."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body


def post(body_framing: bytes, headers: bytes = b"") -> bytes:
    return b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" + headers + b"\r\n" \
        + body_framing


def chunked(payload: bytes, size: int = 7) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + size]), payload[i:i + size])
                    for i in range(0, len(payload), size)) + b"0\r\n\r\n"


def as_json(status: int, body: bytes) -> dict:
    data = json.loads(body)
    if status != 200:
        assert data["status"] == status and data["error"] and data["message"], data
    return data


def test_a_chunked_body_is_read_whole(base):
    payload = json.dumps({"instances": [{schema.join_key: 1000 + i} for i in range(20)]}).encode()
    status, headers, body = exchange(base, post(chunked(payload), b"Transfer-Encoding: chunked\r\n"))
    assert status == 200, body
    assert [p[schema.join_key] for p in as_json(status, body)["predictions"]] == [1000 + i for i in range(20)]


def test_a_chunked_body_over_the_limit_is_a_json_413(base):
    payload = b'{"customer_id": ' + b" " * 70_000 + b"1000}"
    status, _, body = exchange(base, post(chunked(payload, 4096), b"Transfer-Encoding: chunked\r\n"))
    assert status == 413 and "over 65536 bytes" in as_json(status, body)["message"]


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(base):
    status, headers, body = exchange(base, post(b"{", b"Content-Length: 1000000\r\n"))
    assert status == 413 and "over 65536 bytes" in as_json(status, body)["message"]
    assert headers.get("connection") == "close"


def test_broken_chunked_framing_is_a_json_400(base):
    status, _, body = exchange(base, post(b"zz\r\nnot a chunk\r\n", b"Transfer-Encoding: chunked\r\n"))
    assert status == 400 and as_json(status, body)  # granian ends such a body early: "not valid JSON"


def test_a_body_that_stops_coming_is_cut_with_a_json_408(base):
    started = time.monotonic()
    status, headers, body = exchange(base, post(b'{"cus', b"Content-Length: 1000\r\n"))
    waited = time.monotonic() - started
    assert status == 408 and "within 1 s" in as_json(status, body)["message"]
    assert headers.get("connection") == "close"
    assert 0.9 < waited < 3.0


def test_the_app_errors_over_a_socket_are_json_too(base):
    for raw, status in [(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 404),
                        (b"DELETE /predict HTTP/1.1\r\nHost: t\r\n\r\n", 405),
                        (post(b"{x", b"Content-Length: 2\r\n"), 400),
                        (b"GET /predict?customer_id=" + b"0" * 5000 + b"1 HTTP/1.1\r\nHost: t\r\n\r\n", 404)]:
        got, _, body = exchange(base, raw)
        assert got == status and as_json(got, body)


def test_the_errors_only_granian_answers_are_those_docs_api_md_lists(base):
    """Malformed HTTP and oversized headers never reach the app: granian (hyper)
    answers them itself with an empty body. docs/api.md says so; if these become
    JSON one day, the doc should say that instead."""
    too_big = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 600_000 + b"\r\n\r\n"
    for raw, status in [(too_big, 431), (b"NOT HTTP\r\n\r\n", 400)]:
        got, headers, body = exchange(base, raw)
        assert (got, body) == (status, b"")
    from tests.support import ROOT

    doc = (ROOT / "docs" / "api.md").read_text()
    assert "431" in doc and "empty body" in doc
