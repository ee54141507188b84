"""Benchmarks side by side, in one run on one machine (`nox -s bench`).

    python benchmarks/bench.py [--smoke] [--out benchmarks/results]

1. Online serving: /predict (gunicorn, Redis online store) against raw redis-py
   HMGET of the same Feast keys (the floor of a lookup), Feast's SDK
   get_online_features in-process, a minimal gunicorn WSGI app doing one HMGET
   and a dot product (the floor of any Python /predict), and `mlflow models
   serve` of the same registered model (features in the request).
2. Loading the online store: `feast materialize` rows/s into the same Redis.
3. Features: rows/s and peak memory of the features stage against a bare
   pyarrow CSV-to-Parquet pass over the same data.
4. End to end: wall time and peak memory of `python -m pipeline run` by rows.

Traffic goes to 127.0.0.1 only; every load loop is bounded in count and time.
Figures are medians of repetitions after warm-up; compare them as ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import schema  # noqa: E402
from pipeline.cli import STAGES, run_stages  # noqa: E402
from pipeline.settings import Settings  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "n": len(samples)}


def timed_calls(fn, count: int, seconds: float, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        fn()
    out: list[float] = []
    deadline = time.monotonic() + seconds
    while len(out) < count and time.monotonic() < deadline:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# ----------------------------------------------------------------- HTTP load
class Http:
    """A keep-alive HTTP/1.1 client on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None) -> int:
        headers = {"Content-Type": "application/json"} if body else {}
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        resp.read()
        return resp.status


def http_single(port: int, method: str, path: str, body: bytes | None, count: int, seconds: float):
    client = Http(port)
    statuses = []

    def call():
        statuses.append(client.request(method, path, body))

    samples = timed_calls(call, count, seconds)
    assert set(statuses) == {200}, set(statuses)
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


def wait_port(port: int, path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if Http(port).request("GET", path) < 500:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"port {port} not ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- serving
FLOOR_APP = '''
import json, os, numpy as np, redis
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
r = redis.Redis(host="127.0.0.1", port=int(os.environ["P"]), password=os.environ["PW"])
fields = [_mmh3(f"customer_features:{n}") for n in os.environ["F"].split(",")]
coef = np.array(json.loads(os.environ["C"]))
def app(environ, start_response):
    key = EntityKey(join_keys=["customer_id"], entity_values=[Value(int64_val=1000)])
    vals = r.hmget(_redis_key("mlops", key), fields)
    x = np.array([Value.FromString(v).double_val for v in vals])
    body = json.dumps({"prediction": float(x @ coef)}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
'''


def bench_serving(settings: Settings, redis_port: int, password: str, quick: bool, out: dict) -> None:
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from pipeline.featurestore import online_features, open_store

    count, seconds = (300, 3) if quick else (5000, 20)
    tput_seconds = 3 if quick else 15
    clients = 8
    import redis

    r = redis.Redis(host="127.0.0.1", port=redis_port, password=password)
    key = _redis_key("mlops", EntityKey(join_keys=[schema.JOIN_KEY], entity_values=[Value(int64_val=1000)]))
    fields = [_mmh3(f"{schema.FEATURE_VIEW}:{n}") for n in schema.FEATURE_NAMES]
    log("serving: raw redis-py HMGET of one entity's features (the lookup floor)")
    out["raw_redis_hmget"] = percentiles(timed_calls(lambda: r.hmget(key, fields), count * 4, seconds))
    log("serving: Feast SDK get_online_features, in-process")
    store = open_store(settings)
    out["feast_sdk_get_online_features"] = percentiles(
        timed_calls(lambda: online_features(store, [1000]), count, seconds))

    train = json.loads((settings.runs_dir / "train" / "latest.json").read_text())["outputs"]
    coef = [train["coefficients"][n] for n in schema.FEATURE_NAMES]
    servers = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_"))}
    # mlflow models serve starts `uvicorn` by name: the venv's scripts must be on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    procs = []
    try:
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--workers", "2"],
            env={**env, "MLOPS_SHARED_DIR": str(settings.shared), "MLOPS_REDIS_URL": settings.redis_url},
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers["predict (this project)"] = (port, "GET", f"/predict?{schema.JOIN_KEY}=1000", None)
        wait_port(port, "/readyz", procs[-1])

        floor_dir = Path(tempfile.mkdtemp(prefix="bench-floor-"))
        (floor_dir / "floor_app.py").write_text(FLOOR_APP)
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "4", "-b",
             f"127.0.0.1:{port}", "--no-control-socket", "floor_app:app"],
            env={**env, "P": str(redis_port), "PW": password, "F": ",".join(schema.FEATURE_NAMES),
                 "C": json.dumps(coef), "PYTHONPATH": str(floor_dir)},
            cwd=floor_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers["floor app (gunicorn, HMGET + dot)"] = (port, "GET", "/", None)
        wait_port(port, "/", procs[-1])

        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mlops-linear@production",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "2"],
            env={**env, "MLFLOW_TRACKING_URI": settings.tracking_uri}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        features = json.loads((settings.runs_dir / "feast" / "latest.json").read_text())["outputs"]["sample_features"]
        body = json.dumps({"dataframe_split": {"columns": list(schema.FEATURE_NAMES),
                                               "data": [[features[n] for n in schema.FEATURE_NAMES]]}}).encode()
        servers["mlflow models serve (features in the request)"] = (port, "POST", "/invocations", body)
        wait_port(port, "/ping", procs[-1], timeout=180)

        for name, (port, method, path, body) in servers.items():
            log(f"serving: {name}: one client")
            single = http_single(port, method, path, body, count, seconds)
            log(f"serving: {name}: {clients} clients")
            rps = http_throughput(port, method, path, body, clients, tput_seconds, 200_000)
            out[name] = {**single, "req_per_s": rps}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


# --------------------------------------------------------- features & e2e
def child_peak(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a command run in a fresh child process."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.monotonic(); "
               "p = subprocess.run(sys.argv[1:]); "
               "print(json.dumps([time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "p.returncode]))")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    wall, rss_kib, rc = json.loads(proc.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr[-2000:]}")
    return round(wall, 2), round(rss_kib / 1024, 1)


PYARROW_PASS = '''
import sys, glob, pyarrow.csv as pc, pyarrow.parquet as pq
parts = sorted(glob.glob(sys.argv[1] + "/*.csv"))
writer = None
for part in parts:
    reader = pc.open_csv(part)
    for batch in reader:
        if writer is None:
            writer = pq.ParquetWriter(sys.argv[2], batch.schema)
        writer.write_batch(batch)
writer.close()
'''


def bench_features(sizes: list[int], work: Path, env: dict, out: dict) -> None:
    for rows in sizes:
        shared = work / f"features-{rows}"
        e = {**env, "MLOPS_SHARED_DIR": str(shared), "MLOPS_ROWS": str(rows)}
        subprocess.run([sys.executable, "-m", "pipeline", "ingest", "-q"], env=e, cwd=ROOT, check=True,
                       capture_output=True)
        runs = []
        for _ in range(2):
            (shared / "runs" / "features" / "latest.json").unlink(missing_ok=True)
            runs.append(child_peak([sys.executable, "-m", "pipeline", "features", "-q"], e))
        wall, rss = min(runs)
        raw = [child_peak([sys.executable, "-c", PYARROW_PASS, str(shared / "data/raw"),
                           str(work / f"bare-{rows}.parquet")], e) for _ in range(2)]
        bare_wall, bare_rss = min(raw)
        out[str(rows)] = {"features_rows_per_s": round(rows / wall), "features_peak_mib": rss,
                          "pyarrow_rows_per_s": round(rows / bare_wall), "pyarrow_peak_mib": bare_rss,
                          "ratio_to_pyarrow": round(bare_wall / wall, 3)}
        log(f"features {rows}: {out[str(rows)]}")


def bench_end_to_end(sizes: list[int], work: Path, env: dict, out: dict) -> None:
    for rows in sizes:
        shared = work / f"e2e-{rows}"
        e = {**env, "MLOPS_SHARED_DIR": str(shared), "MLOPS_ROWS": str(rows)}
        wall, rss = child_peak([sys.executable, "-m", "pipeline", "run", "-q"], e)
        stages = {s: json.loads((shared / "runs" / s / "latest.json").read_text())["seconds"] for s in STAGES}
        out[str(rows)] = {"wall_s": wall, "peak_mib": rss, "stages_s": stages}
        log(f"end to end {rows}: {out[str(rows)]}")


# ------------------------------------------------------------------ report
def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    serving = results["serving"]
    names = list(serving)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    a1.barh(names, [serving[n]["p50_ms"] for n in names], label="p50")
    a1.barh(names, [serving[n]["p99_ms"] - serving[n]["p50_ms"] for n in names],
            left=[serving[n]["p50_ms"] for n in names], alpha=0.5, label="p99")
    a1.set(xlabel="ms (single client)", title="Latency, one entity")
    a1.set_xscale("log")
    a1.set_xlim(left=0.02)  # bars start at 0, which a log axis cannot show
    a1.legend()
    http_names = [n for n in names if "req_per_s" in serving[n]]
    a2.barh(http_names, [serving[n]["req_per_s"] for n in http_names])
    a2.set(xlabel="requests/s, 8 clients", title="Throughput over HTTP")
    fig.tight_layout()
    fig.savefig(out / "serving.png", dpi=100)

    e2e = results["end_to_end"]
    rows = sorted(int(r) for r in e2e)
    fig, (b1, b2) = plt.subplots(1, 2, figsize=(12, 4.5))
    b1.plot(rows, [e2e[str(r)]["wall_s"] for r in rows], "o-", label="python -m pipeline run")
    b1.set(xscale="log", yscale="log", xlabel="rows", ylabel="seconds", title="End to end")
    for stage in STAGES:
        b1.plot(rows, [e2e[str(r)]["stages_s"][stage] for r in rows], ".--", label=stage, alpha=0.7)
    b1.legend(fontsize=8)
    feats = results["features"]
    frows = sorted(int(r) for r in feats)
    b2.plot(frows, [feats[str(r)]["features_rows_per_s"] for r in frows], "o-", label="features stage")
    b2.plot(frows, [feats[str(r)]["pyarrow_rows_per_s"] for r in frows], "s-", label="bare pyarrow pass")
    b2.set(xscale="log", xlabel="rows", ylabel="rows/s", title="Features throughput")
    b2.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=100)


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", "", "| serving | p50 ms | p99 ms | req/s (8 clients) |",
             "|---|---|---|---|"]
    for name, r in results["serving"].items():
        lines.append(f"| {name} | {r['p50_ms']} | {r['p99_ms']} | {r.get('req_per_s', '')} |")
    lines += ["", "| features rows | stage rows/s | stage peak MiB | pyarrow rows/s | pyarrow peak MiB | ratio |",
              "|---|---|---|---|---|---|"]
    for rows, r in results["features"].items():
        lines.append(f"| {rows} | {r['features_rows_per_s']} | {r['features_peak_mib']} | "
                     f"{r['pyarrow_rows_per_s']} | {r['pyarrow_peak_mib']} | {r['ratio_to_pyarrow']} |")
    lines += ["", "| end-to-end rows | wall s | peak MiB | " + " | ".join(STAGES) + " |",
              "|---|---|---|" + "---|" * len(STAGES)]
    for rows, r in results["end_to_end"].items():
        lines.append(f"| {rows} | {r['wall_s']} | {r['peak_mib']} | "
                     + " | ".join(str(r["stages_s"][s]) for s in STAGES) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the suite still works")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mlops-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_"))}
    results: dict = {"machine": f"{platform.node()}: {os.cpu_count()} cores, "
                                f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                                f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}",
                     "smoke": args.smoke}
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    import secrets

    from testcontainers.community.redis import RedisContainer

    password = secrets.token_hex(16)
    redis_c = RedisContainer(os.environ.get("MLOPS_REDIS_IMAGE", "redis:7-bookworm"), password=password)
    redis_c.ports = {"6379/tcp": ("127.0.0.1", None)}
    with redis_c:
        redis_port = int(redis_c.get_exposed_port(6379))
        url = f"redis://:{password}@127.0.0.1:{redis_port}/0"
        rows = 2000 if args.smoke else 10_000
        settings = Settings(shared_dir=work / "serving", redis_url=url, rows=rows, mlflow_tracking_uri=None)
        log(f"serving: pipeline run with {rows} rows into Redis")
        started = time.monotonic()
        run_stages(settings, STAGES)
        feast = json.loads((settings.runs_dir / "feast" / "latest.json").read_text())
        results["loading"] = {"feast_materialize": {
            "entities": rows // 5, "seconds": feast["seconds"],
            "rows_per_s": round(rows / 5 / max(feast["seconds"], 1e-9))}}
        log(f"pipeline in {time.monotonic() - started:.1f}s")
        results["serving"] = {}
        bench_serving(settings, redis_port, password, args.smoke, results["serving"])
    results["features"] = {}
    bench_features([10_000] if args.smoke else [100_000, 1_000_000], work, env, results["features"])
    results["end_to_end"] = {}
    bench_end_to_end([2_000, 10_000] if args.smoke else [10_000, 100_000, 1_000_000], work, env,
                     results["end_to_end"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plots(results, out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
