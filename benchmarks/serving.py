"""Online serving, held to a floor and to the peers a user would otherwise run.

- **the granian floor**: the same HTTP server as /predict (granian, 2 workers, each a
  server of its own on the port, as ``pipeline serve`` runs them) with
  a minimal WSGI app doing one HMGET and a dot product (:mod:`benchmarks.floor_app`).
  /predict's p50 and p99 over the floor's, with wrk and with a Python keep-alive
  client (``http.client``), one client and 8 clients, in interleaved rounds.
- **batch**: a POST of 1,000 entities to /predict against Feast's SDK
  ``get_online_features`` for the same 1,000 entities in-process, rows/s.
- **the stock chain**: Feast's own feature server (``feast serve``) and then
  ``mlflow models serve`` of the same registered model, two HTTP hops per
  prediction, requests/s with the Python client (which chains the two calls),
  against /predict's with the same client and with wrk.

Servers are measured in interleaved rounds, so a slow spell of this shared
machine hits all of them alike; ratios are taken within a round, then the
median over rounds. Traffic goes to 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import WRK, Http, Run, log, median, percentiles, timed_calls, wrk_run
from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES
from pipeline.dataset import CUSTOMERS as schema
from pipeline.io import read_record
from pipeline.settings import Settings
from tests.support import LOOPBACK, free_port, listeners, started, wait_until

PREDICT = "predict (this project)"
FLOOR = "granian floor (HMGET + dot)"
CHAIN = "feast serve + mlflow models serve"
CLIENTS = 8
BATCH = 1000
DATABASE = 0  # the Redis database this benchmark loads
# Without a redis-server of its own, Redis is reached through docker's loopback
# proxy, which adds its own latency on a busy machine: a lookup timeout above the
# 50 ms default (meant for the direct path between pods) keeps the proxy's stalls
# from turning into 503s. Every server here reads the same Redis the same way.
LOOKUP_TIMEOUT_SECONDS = "5"


def model_artifacts(settings: Settings) -> str:
    """Where the registry keeps the version the serving alias points at."""
    from pipeline.registry import alias_version, open_client

    client = open_client(settings.tracking_uri)
    version = alias_version(client, settings.model_name, settings.model_alias)
    return client.get_model_version_download_uri(settings.model_name, version.version)


def lookups(settings: Settings, entity: int, quick: bool, out: dict) -> None:
    """The lookup alone, in-process: raw HMGET (the floor of a lookup) and Feast's SDK."""
    from pipeline.feast import online_features, open_store
    from pipeline.redis_layout import FeastRedisLayout, connect

    count, seconds = (300, 3) if quick else (5000, 20)
    client, layout = connect(settings, 10), FeastRedisLayout(schema)
    key = layout.feast_key(entity)
    log("serving: raw redis-py HMGET of one entity's features (the lookup floor)")
    out["raw_redis_hmget"] = percentiles(timed_calls(lambda: client.hmget(key, layout.fields), count * 4, seconds))
    log("serving: Feast SDK get_online_features, in-process")
    store = open_store(settings)
    out["feast_sdk_get_online_features"] = percentiles(
        timed_calls(lambda: online_features(store, schema, [entity]), count, seconds))


def batch(settings: Settings, entities: list[int], port: int, quick: bool, out: dict) -> None:
    """rows/s of one POST of ``len(entities)`` entities against Feast's SDK for the same entities."""
    from pipeline.feast import online_features, open_store

    count, seconds = (5, 3) if quick else (200, 15)
    body = json.dumps({"instances": [{schema.join_key: e} for e in entities]}).encode()
    client = Http(port)

    def post() -> None:
        if client.request("POST", "/predict", body) != 200:
            raise RuntimeError("a batch POST to /predict failed")

    store = open_store(settings)
    log(f"serving: batch of {len(entities)}: POST /predict and Feast's SDK, interleaved")
    ours, feast = [], []
    for _ in range(1 if quick else 5):
        ours += timed_calls(post, count, seconds / 5, warmup=2)
        feast += timed_calls(lambda: online_features(store, schema, entities), count, seconds / 5, warmup=2)
    rows = {"predict_post": len(entities) / median(ours), "feast_sdk": len(entities) / median(feast)}
    out["batch"] = {"entities": len(entities), "predict_post_rows_per_s": round(rows["predict_post"]),
                    "feast_sdk_rows_per_s": round(rows["feast_sdk"]),
                    "predict_post_ms": round(median(ours) * 1000, 2), "feast_sdk_ms": round(median(feast) * 1000, 2)}


class ChainClient:
    """One prediction the stock way: features from ``feast serve``, then ``mlflow models serve``.

    Keep-alive, reconnecting once when a server closed the connection (``feast serve``'s
    workers restart after ``--max-requests``, 1000 by default), as an HTTP library would."""

    def __init__(self, feast_port: int, mlflow_port: int) -> None:
        self.ports = {"feast": feast_port, "mlflow": mlflow_port}
        self.conns = {name: Http(port) for name, port in self.ports.items()}

    def _post(self, server: str, path: str, body: str) -> dict:
        for attempt in (0, 1):
            try:
                conn = self.conns[server].conn
                conn.request("POST", path, headers={"Content-Type": "application/json"}, body=body)
                resp = conn.getresponse()
                answer = json.loads(resp.read())
                break
            except (http.client.HTTPException, ConnectionError):
                if attempt:
                    raise
                self.conns[server].conn.close()
                self.conns[server] = Http(self.ports[server])
        if resp.status != 200:
            raise RuntimeError(f"{server} answered {resp.status}: {str(answer)[:300]}")
        return answer

    def predict(self, entity: int) -> float:
        refs = list(schema.feature_refs())
        got = self._post("feast", "/get-online-features",
                         json.dumps({"features": refs, "entities": {schema.join_key: [entity]}}))
        names = [n.split(":")[-1] for n in got["metadata"]["feature_names"]]
        values = {n: r["values"][0] for n, r in zip(names, got["results"])}
        row = [[values[n] for n in schema.feature_names]]
        body = json.dumps({"dataframe_split": {"columns": list(schema.feature_names), "data": row}})
        return self._post("mlflow", "/invocations", body)["predictions"][0]


def python_clients(call_of, clients: int, seconds: float, max_calls: int) -> dict:
    """``clients`` threads, each with its own keep-alive connection(s), warmed up, then
    calling for ``seconds`` (at most ``max_calls`` in all): latency percentiles and calls/s."""
    samples: list[list[float]] = [[] for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    window = [float("inf")]  # the end of the measuring window, set once every client is warm

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            call = call_of()
            for _ in range(10):
                call()
            ready.wait(120)
            while time.monotonic() < window[0] and len(samples[i]) < max_calls // clients:
                t = time.perf_counter()
                call()
                samples[i].append(time.perf_counter() - t)
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(120)
    started_at = time.monotonic()
    window[0] = started_at + seconds
    for t in threads:
        t.join(seconds + 60)
    if errors:
        raise errors[0]
    flat = [s for per in samples for s in per]
    if not flat:
        raise RuntimeError("no call finished within the measuring window")
    return {**percentiles(flat), "req_per_s": round(len(flat) / (time.monotonic() - started_at), 1)}


def section_redis(run: Run, stack: contextlib.ExitStack) -> tuple[str, str]:
    """``(URL, how it is reached)`` of the Redis every server here reads.

    A redis-server of this section's own on 127.0.0.1 where Debian's package is
    installed: the service then reaches Redis directly, as it does over compose's
    network or between pods. The harness's container is reached through docker's
    userland proxy in front of its published port, a process that copies every
    byte and takes CPU from the servers on a two-core machine (measured side by
    side, docs/performance.md); it is the fallback."""
    if shutil.which("redis-server"):
        from tests.cluster_support import redis_single

        url = stack.enter_context(redis_single(run.work / "serving-redis", password=secrets.token_hex(16)))
        return url, f"its own redis-server on {LOOPBACK}, reached directly"
    return run.redis_url_of(DATABASE), f"the harness's container on {LOOPBACK}, through docker's proxy"


def bench(run: Run, out: dict) -> None:
    with contextlib.ExitStack() as stack:
        redis_url, redis_how = section_redis(run, stack)
        measured(run, redis_url, out)
        out["method"]["redis"] = f"{redis_how}, lookup timeout {LOOKUP_TIMEOUT_SECONDS} s"


def measured(run: Run, redis_url: str, out: dict) -> None:
    rows = 2000 if run.smoke else 10_000
    settings = Settings(shared_dir=run.work / "serving", redis_url=redis_url, rows=rows,
                        mlflow_tracking_uri=None, online_timeout_seconds=float(LOOKUP_TIMEOUT_SECONDS))
    log(f"serving: pipeline run with {rows} rows into Redis")
    run_stages(settings, STAGE_NAMES)
    feast = read_record(settings.runs_dir, "feast").outputs
    entity = int(feast["sample_entity"])
    entities = [entity + i for i in range(min(BATCH, int(read_record(settings.runs_dir, "ingest").outputs["entities"])))]
    coefficients = read_record(settings.runs_dir, "train").outputs["coefficients"]
    lookups(settings, entity, run.smoke, out)

    env = run.env
    # mlflow models serve and feast serve start their servers by name: the venv's scripts must be on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ports = {name: free_port() for name in ("predict", "floor", "feast", "mlflow")}
    url = {name: f"http://{LOOPBACK}:{port}" for name, port in ports.items()}
    scripts = Path(sys.executable).parent
    with contextlib.ExitStack() as stack:
        stack.enter_context(started(
            [sys.executable, "-m", "pipeline", "serve", "--host", LOOPBACK, "--port", str(ports["predict"]),
             "--workers", "2"], f"{url['predict']}/readyz",
            {**env, "MLOPS_SHARED_DIR": str(settings.shared), "MLOPS_REDIS_URL": settings.redis_url,
             "MLOPS_ONLINE_TIMEOUT_SECONDS": LOOKUP_TIMEOUT_SECONDS, "MLOPS_PREDICTION_LOG": "false"}))
        # the floor is served as /predict is (pipeline.launcher.supervise): two granian servers of
        # one worker each on the port, so the kernel spreads a client's connections over both
        for _ in range(2):
            stack.enter_context(started(
                [str(scripts / "granian"), "--interface", "wsgi", "--host", LOOPBACK, "--port", str(ports["floor"]),
                 "--workers", "1", "--no-ws", "--log-level", "warning", "benchmarks.floor_app:app"],
                f"{url['floor']}/",
                {**env, "FLOOR_REDIS_URL": settings.redis_url, "FLOOR_ENTITY": str(entity),
                 "FLOOR_COEFFICIENTS": json.dumps([coefficients[n] for n in schema.feature_names])}))
        for name in ("predict", "floor"):  # the first server ready answers: wait for the second
            wait_until(lambda name=name: listeners(ports[name]) == 2, 60, f"both {name} servers to listen")
        _, _, _, password = settings.redis_parts()
        stack.enter_context(started(
            [str(scripts / "feast"), "-c", str(settings.feast_dir), "serve", "-h", LOOPBACK,
             "-p", str(ports["feast"]), "-w", "2", "--no-access-log"], f"{url['feast']}/health",
            {**env, "MLOPS_REDIS_PASSWORD": password or ""}, timeout=180))
        stack.enter_context(started(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_artifacts(settings),
             "--env-manager", "local", "-h", LOOPBACK, "-p", str(ports["mlflow"]), "-w", "2"],
            f"{url['mlflow']}/ping", {**env, "MLFLOW_TRACKING_URI": settings.tracking_uri}, timeout=180))
        batch(settings, entities, ports["predict"], run.smoke, out)
        measure(ports, entity, run.smoke, out)


def measure(ports: dict[str, int], entity: int, quick: bool, out: dict) -> None:
    rounds, window = (1, 1) if quick else (5, 3)
    servers = {PREDICT: (ports["predict"], f"/predict?{schema.join_key}={entity}"), FLOOR: (ports["floor"], "/")}

    def http_call(port: int, path: str):
        def make():
            client = Http(port)
            return lambda: client.request("GET", path)
        return make

    def chain_call():
        client = ChainClient(ports["feast"], ports["mlflow"])
        return lambda: client.predict(entity)

    runs: dict[str, dict[str, list[dict]]] = {}
    for name, (port, path) in servers.items():  # warm-up
        python_clients(http_call(port, path), CLIENTS, 1, 10_000)
    python_clients(chain_call, CLIENTS, 1, 1_000)
    for i in range(rounds):
        for clients in (1, CLIENTS):
            for name, (port, path) in servers.items():
                log(f"serving: {name}: {clients} client(s), round {i + 1}/{rounds}")
                if WRK:
                    runs.setdefault(f"wrk/{clients}/{name}", []).append(
                        wrk_run(port, "GET", path, None, clients, window))
                runs.setdefault(f"python/{clients}/{name}", []).append(
                    python_clients(http_call(port, path), clients, window, 400_000))
        log(f"serving: {CHAIN}: {CLIENTS} clients, round {i + 1}/{rounds}")
        runs.setdefault(f"python/{CLIENTS}/{CHAIN}", []).append(python_clients(chain_call, CLIENTS, window, 50_000))

    out["servers"] = {key: {k: median([r[k] for r in rs]) for k in ("p50_ms", "p99_ms", "req_per_s")}
                      for key, rs in runs.items()}
    out["rounds"] = runs  # each round's figures, the ratios' inputs
    ratios = {}
    for client in ("wrk", "python"):
        for clients in (1, CLIENTS):
            ours, floor = runs.get(f"{client}/{clients}/{PREDICT}"), runs.get(f"{client}/{clients}/{FLOOR}")
            if not ours:
                continue
            for p in ("p50", "p99"):
                ratios[f"{client}/{clients}: {p} over the floor's"] = median(
                    [a[f"{p}_ms"] / b[f"{p}_ms"] for a, b in zip(ours, floor)])
    # The chain needs two calls per prediction, so only a client that chains them
    # (the Python one) measures it. Both ratios are reported: /predict under the
    # same Python client (like for like, but that client tops out near the
    # floor's rate, so it measures itself too), and /predict under wrk.
    for client in ("python", "wrk"):
        if runs.get(f"{client}/{CLIENTS}/{PREDICT}"):
            ratios[f"{client}/{CLIENTS}: req/s over the stock chain's python/{CLIENTS}"] = median(
                [a["req_per_s"] / b["req_per_s"] for a, b in zip(runs[f"{client}/{CLIENTS}/{PREDICT}"],
                                                                runs[f"python/{CLIENTS}/{CHAIN}"])])
    b = out["batch"]
    ratios["batch: rows/s over Feast's SDK"] = round(
        b["predict_post_rows_per_s"] / b["feast_sdk_rows_per_s"], 2)
    out["ratios"] = ratios
    out["method"] = {"clients": ["wrk (C, keep-alive)"] * bool(WRK) + ["Python http.client threads"],
                     "rounds": rounds, "seconds_per_run": window, "many_clients": CLIENTS}


# The targets: (ratio key, wanted, test)
TARGETS = [
    *[(f"{c}/{n}: p50 over the floor's", "<= 1.25", lambda r: r <= 1.25) for c in ("wrk", "python") for n in (1, 8)],
    *[(f"{c}/{n}: p99 over the floor's", "<= 1.5", lambda r: r <= 1.5) for c in ("wrk", "python") for n in (1, 8)],
    ("batch: rows/s over Feast's SDK", ">= 3", lambda r: r >= 3),
    *[(f"{c}/8: req/s over the stock chain's python/8", ">= 20", lambda r: r >= 20) for c in ("wrk", "python")],
]
