"""Online serving: /predict (granian, Redis online store) against raw redis-py HMGET
of the same Feast keys, Feast's SDK in-process, the floor app
(:mod:`benchmarks.floor_app`) and ``mlflow models serve`` of the same registered
model (features in the request). Servers are measured in interleaved rounds."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from benchmarks.common import WRK, Run, log, median, percentiles, python_run, timed_calls, wrk_run
from pipeline.dataset import CUSTOMERS as schema
from pipeline.cli import run_stages
from pipeline.dag import STAGE_NAMES
from pipeline.io import read_record
from pipeline.settings import Settings
from tests.support import LOOPBACK, free_port, started

PREDICT = "predict (this project)"
FLOOR = "floor app (gunicorn, HMGET + dot)"
MLFLOW = "mlflow models serve (features in the request)"
CLIENTS = 8
DATABASE = 0  # the Redis database this benchmark loads
# Redis is reached through docker's loopback proxy here, which adds its own
# latency on a busy machine: a lookup timeout above the 50 ms default (meant for
# the direct path between pods) keeps the proxy's stalls from turning into 503s.
# The floor app goes through the same proxy, so the ratios compare like with like.
LOOKUP_TIMEOUT_SECONDS = "1"


def model_artifacts(settings: Settings) -> str:
    """Where the registry keeps the version the serving alias points at."""
    from pipeline.registry import alias_version, open_client

    client = open_client(settings.tracking_uri)
    version = alias_version(client, settings.model_name, settings.model_alias)
    return client.get_model_version_download_uri(settings.model_name, version.version)


def lookups(settings: Settings, entity: int, quick: bool, out: dict) -> None:
    """The lookup alone, in-process: raw HMGET (the floor) and Feast's SDK."""
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


def bench(run: Run, out: dict) -> None:
    rows = 2000 if run.smoke else 10_000
    settings = Settings(shared_dir=run.work / "serving", redis_url=run.redis_url_of(DATABASE), rows=rows,
                        mlflow_tracking_uri=None)
    log(f"serving: pipeline run with {rows} rows into Redis")
    run_stages(settings, STAGE_NAMES)
    feast = read_record(settings.runs_dir, "feast").outputs
    entity, sample = int(feast["sample_entity"]), feast["sample_features"]
    coefficients = read_record(settings.runs_dir, "train").outputs["coefficients"]
    lookups(settings, entity, run.smoke, out)

    env = run.env
    # mlflow models serve starts `uvicorn` by name: the venv's scripts must be on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ports = {name: free_port() for name in (PREDICT, FLOOR, MLFLOW)}
    servers = {
        PREDICT: ("GET", f"/predict?{schema.join_key}={entity}", None),
        FLOOR: ("GET", "/", None),
        MLFLOW: ("POST", "/invocations", json.dumps({"dataframe_split": {
            "columns": list(schema.feature_names), "data": [[sample[n] for n in schema.feature_names]]}}).encode()),
    }
    base = {name: f"http://{LOOPBACK}:{port}" for name, port in ports.items()}
    with contextlib.ExitStack() as stack:
        stack.enter_context(started(
            [sys.executable, "-m", "pipeline", "serve", "--host", LOOPBACK, "--port", str(ports[PREDICT]),
             "--workers", "2"], f"{base[PREDICT]}/readyz",
            {**env, "MLOPS_SHARED_DIR": str(settings.shared), "MLOPS_REDIS_URL": settings.redis_url,
             "MLOPS_ONLINE_TIMEOUT_SECONDS": LOOKUP_TIMEOUT_SECONDS}))
        stack.enter_context(started(
            [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "4", "-b",
             f"{LOOPBACK}:{ports[FLOOR]}", "--no-control-socket", "benchmarks.floor_app:app"], f"{base[FLOOR]}/",
            {**env, "FLOOR_REDIS_URL": settings.redis_url, "FLOOR_ENTITY": str(entity),
             "FLOOR_COEFFICIENTS": json.dumps([coefficients[n] for n in schema.feature_names])}))
        stack.enter_context(started(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_artifacts(settings),
             "--env-manager", "local", "-h", LOOPBACK, "-p", str(ports[MLFLOW]), "-w", "2"],
            f"{base[MLFLOW]}/ping", {**env, "MLFLOW_TRACKING_URI": settings.tracking_uri}, timeout=180))
        measure_servers({name: (ports[name], *request) for name, request in servers.items()}, run.smoke, out)


def measure_servers(servers: dict[str, tuple], quick: bool, out: dict) -> None:
    """Interleaved rounds: every server is measured once per round, so a slow spell
    of this shared machine hits all of them alike; the ratios are taken within a
    round, then the median over rounds."""
    measure = wrk_run if WRK else python_run
    rounds, window = (1, 1) if quick else (5, 3)
    for port, method, path, body in servers.values():  # warm-up
        measure(port, method, path, body, CLIENTS, 1)
    runs: dict[str, dict[str, list[dict]]] = {name: {"single": [], "clients": []} for name in servers}
    for kind, clients in (("single", 1), ("clients", CLIENTS)):
        for i in range(rounds):
            for name, (port, method, path, body) in servers.items():
                log(f"serving: {name}: {clients} client(s), round {i + 1}/{rounds}")
                runs[name][kind].append(measure(port, method, path, body, clients, window))
    for name, r in runs.items():
        out[name] = {"p50_ms": median([x["p50_ms"] for x in r["single"]]),
                     "p99_ms": median([x["p99_ms"] for x in r["single"]]),
                     "req_per_s": median([x["req_per_s"] for x in r["clients"]])}
    out["ratios"] = {
        "predict_p50_over_floor_p50": median([a["p50_ms"] / b["p50_ms"] for a, b in
                                              zip(runs[PREDICT]["single"], runs[FLOOR]["single"])]),
        "predict_req_per_s_over_mlflow": median([a["req_per_s"] / b["req_per_s"] for a, b in
                                                 zip(runs[PREDICT]["clients"], runs[MLFLOW]["clients"])]),
        "floor_req_per_s_over_mlflow": median([a["req_per_s"] / b["req_per_s"] for a, b in
                                               zip(runs[FLOOR]["clients"], runs[MLFLOW]["clients"])]),
    }
    out["method"] = {"client": "wrk (C, keep-alive)" if WRK else "Python http.client threads",
                     "rounds": rounds, "seconds_per_run": window, "clients": CLIENTS,
                     "redis": f"{LOOPBACK}, the container's published port (docker's proxy), "
                              f"lookup timeout {LOOKUP_TIMEOUT_SECONDS} s"}
