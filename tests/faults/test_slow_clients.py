"""Slow clients (slowloris): 64 connections announce a 1000-byte body and send
one byte (a few keep trickling a byte now and then) while other clients call
/healthz and /predict. Those answer within 100 ms, and every stalled body is
cut with a JSON 408 once MLOPS_BODY_TIMEOUT_SECONDS has passed. The app is the
one over in-memory fakes, served by granian exactly as ``python -m pipeline
serve`` serves the real one (tests/service/served.py). Bounded: about 10 s."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

from pipeline.dataset import CUSTOMERS as schema
from tests.service.served import serving

pytestmark = pytest.mark.faults
STALLED, TRICKLING, BODY_TIMEOUT = 64, 8, 3.0


def stall(base: str, trickle: bool, results: list, stop: threading.Event) -> None:
    """One slow client: headers, one byte of a 1000-byte body, then (trickle) a byte every 0.5 s."""
    parts = urlsplit(base)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=BODY_TIMEOUT + 10)
    started = time.monotonic()
    try:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        if trickle:
            sock.settimeout(0.5)
        data = b""
        while not stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b" ")  # still "sending": a byte now and then
                continue
            if not chunk:
                break
            data += chunk
        results.append((time.monotonic() - started, data))
    except OSError as exc:
        results.append((time.monotonic() - started, repr(exc).encode()))
    finally:
        sock.close()


def timed_get(url: str) -> tuple[float, int]:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=5) as resp:
        resp.read()
        return time.monotonic() - started, resp.status


def test_slow_bodies_hold_no_one_up_and_are_cut_with_a_408(tmp_path, figures):
    with serving(tmp_path, workers=2, MLOPS_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT)) as base:
        for _ in range(20):  # warm: both workers answer
            timed_get(f"{base}/healthz")
        results: list = []
        stop = threading.Event()
        clients = [threading.Thread(target=stall, args=(base, i < TRICKLING, results, stop), daemon=True)
                   for i in range(STALLED)]
        opened = time.monotonic()
        for client in clients:
            client.start()
        time.sleep(0.3)  # every slow client has sent its headers and its byte
        others = []
        while time.monotonic() - opened < BODY_TIMEOUT - 0.5:  # while all 64 are stalled
            others.append(timed_get(f"{base}/healthz"))
            others.append(timed_get(f"{base}/predict?{schema.join_key}=1001"))
            time.sleep(0.02)
        for client in clients:
            client.join(BODY_TIMEOUT + 5)
        stop.set()
        cut_after = time.monotonic() - opened

    assert all(status == 200 for _, status in others)
    slowest = max(seconds for seconds, _ in others)
    assert slowest < 0.1, f"a request took {slowest * 1000:.0f} ms beside {STALLED} slow clients"
    assert len(results) == STALLED
    for seconds, data in results:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data[:200]
        assert json.loads(body)["status"] == 408
        assert BODY_TIMEOUT - 0.2 < seconds < BODY_TIMEOUT + 2, seconds
    latencies = sorted(seconds * 1000 for seconds, _ in others)
    figures["slow clients: requests answered beside 64 stalled bodies"] = len(others)
    figures["slow clients: their latency p50 / max (ms)"] = (round(latencies[len(latencies) // 2], 1),
                                                           round(latencies[-1], 1))
    figures["slow clients: stalled bodies cut after (s), slowest"] = round(max(s for s, _ in results), 2)
    assert cut_after < BODY_TIMEOUT + 8
