"""What every benchmark needs: timing, HTTP load on 127.0.0.1, child processes
measured for wall time and peak memory, and inputs made by the pipeline itself."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.support import LOOPBACK, ROOT, clean_env


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


@dataclass(frozen=True)
class Run:
    """One benchmark run: sizes, the work folder, the child environment, Redis."""

    smoke: bool
    work: Path
    redis_url_of: Callable[[int], str] | None = None  # database number -> URL on 127.0.0.1

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment without MLOPS_*/MLFLOW_*: children get only what they are given."""
        return clean_env()


def median(values) -> float:
    return round(float(statistics.median(values)), 3)


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "n": len(samples)}


def timed_calls(fn: Callable[[], object], count: int, seconds: float, warmup: int = 50) -> list[float]:
    """Durations of up to ``count`` calls of ``fn`` within ``seconds``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    deadline = time.monotonic() + seconds
    while len(out) < count and time.monotonic() < deadline:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# ----------------------------------------------------------------- children
def child_peak(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a command run in a fresh child process
    (:mod:`benchmarks.peak` measures it, so this process's memory does not count)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peak", *cmd], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr[-2000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    return round(measured["seconds"], 2), round(measured["peak_kib"] / 1024, 1)


def pipeline(args: list[str], env: dict[str, str]) -> None:
    """``python -m pipeline ARGS -q``, failing with its output."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args, "-q"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline {args} failed: {proc.stderr[-2000:]}")


def prepare_features(shared: Path, rows: int, env: dict[str, str]) -> dict[str, str]:
    """Raw data and the features file for ``rows`` rows in ``shared``, made by the
    pipeline's own ingest and features stages; returns the environment that names them."""
    e = {**env, "MLOPS_SHARED_DIR": str(shared), "MLOPS_ROWS": str(rows)}
    pipeline(["ingest"], e)
    pipeline(["features"], e)
    return e


# ----------------------------------------------------------------- HTTP load
class Http:
    """A keep-alive HTTP/1.1 client on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None) -> int:
        headers = {"Content-Type": "application/json"} if body else {}
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        resp.read()
        return resp.status


def http_single(port: int, method: str, path: str, body: bytes | None, count: int, seconds: float) -> dict:
    client = Http(port)
    statuses = []

    def call():
        statuses.append(client.request(method, path, body))

    samples = timed_calls(call, count, seconds)
    if set(statuses) != {200}:
        raise RuntimeError(f"{path} answered {sorted(set(statuses))}")
    return percentiles(samples)


def http_throughput(port: int, method: str, path: str, body: bytes | None, clients: int, seconds: float,
                    max_requests: int) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        c = Http(port)
        for _ in range(20):
            c.request(method, path, body)
        while time.monotonic() < stop and done[i] < max_requests // clients:
            if c.request(method, path, body) == 200:
                done[i] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return round(sum(done) / (time.monotonic() - started), 1)


WRK = shutil.which("wrk")


def _duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk_run(port: int, method: str, path: str, body: bytes | None, clients: int, seconds: float) -> dict:
    """One wrk run (C, keep-alive): requests/s and latency percentiles.

    wrk costs the machine far less per request than a Python client, so on
    two cores the servers, not the client, set the pace. Any non-2xx answer
    fails the run.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f"wrk.method = {json.dumps(method)}\n")
        if body:
            script.write(f"wrk.body = {json.dumps(body.decode())}\n"
                         'wrk.headers["Content-Type"] = "application/json"\n')
    try:
        out = subprocess.run([WRK, f"-t{min(clients, 2)}", f"-c{clients}", f"-d{seconds}s", "--latency",
                              "-s", script.name, f"http://{LOOPBACK}:{port}{path}"],
                             capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {path}:\n{out}")
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return {"req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": _duration_ms(latency["50"]), "p99_ms": _duration_ms(latency["99"])}


def python_run(port: int, method: str, path: str, body: bytes | None, clients: int, seconds: float) -> dict:
    """The same measurement with a Python client, where wrk is not installed."""
    if clients == 1:
        return {**http_single(port, method, path, body, 200_000, seconds), "req_per_s": None}
    return {"req_per_s": http_throughput(port, method, path, body, clients, seconds, 400_000)}
