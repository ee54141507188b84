"""Where a ``/predict`` request's time goes, in-process: the real request path
against the granian floor's, side by side, and a cProfile of ours.

    python -m benchmarks.predict_profile                 # multiprocess metrics, no prediction log
    python -m benchmarks.predict_profile --log           # with the prediction log on
    python -m benchmarks.predict_profile --single        # metrics in memory (one worker)
    python -m benchmarks.predict_profile --against DIR   # and another checkout's, side by side

A real redis-server on a free 127.0.0.1 port holds one feature view in Feast's
layout (:func:`pipeline.redis_layout.FeastRedisLayout.hset`, as the loader
writes it). The service is :func:`pipeline.serve.create_app` over the real
Redis reader and the real metrics, behind the real RSGI front
(:class:`pipeline.front.RSGIFront`), each call awaited inside one running
event loop (uvloop where it is installed, as granian's "auto" loop picks);
only the model registry is replaced (a loaded model in memory), and
HTTP parsing, which granian does in Rust for both servers, is left out. The
floor is :mod:`benchmarks.floor_app`'s WSGI callable with an environ like the
one granian builds. By default the metrics are in prometheus-client's
multiprocess mode and the prediction log is off, as the serving benchmark
runs ``pipeline serve`` (2 workers, ``MLOPS_PREDICTION_LOG=false``).

Layers timed, each as µs per call (median of interleaved rounds):

- ``floor``: the floor app (redis-py ``hmget``, decode, dot product, JSON);
- ``read``: our reader's HMGET round trip and decode alone;
- ``lookup``: :meth:`pipeline.online.OnlineFeatures.lookup` (read, back-off, metric);
- ``wsgi GET``: the werkzeug app for ``GET /predict?customer_id=N``;
- ``rsgi GET`` / ``rsgi POST``: the same through the RSGI front (what granian calls).

With ``--against DIR`` each of ours is followed by the same layer of the
``pipeline`` package in DIR (another checkout, e.g. ``git worktree add DIR
<commit>``), built and timed in this process, marked ``(against)``.

Every loop is bounded in count and time; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ENTITIES = 200
FIRST = 1000


class _Scope:
    """The attributes of granian's RSGI HTTP scope that the front reads."""

    proto, http_version, scheme = "http", "1.1", "http"
    server, client = "127.0.0.1:8000", "127.0.0.1:50000"

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str]) -> None:
        self.method, self.path, self.query_string, self.headers = method, path, query, headers


class _Protocol:
    """granian's RSGI HTTP protocol, for one request: its body, and the answer kept."""

    def __init__(self, body: bytes = b"") -> None:
        self.body, self.status, self.payload = body, None, None

    def response_bytes(self, status, headers, payload) -> None:
        self.status, self.payload = status, payload

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        if self.body:
            yield self.body


def _floor_environ(entity: int) -> dict:
    return {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8001", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1:8001", "HTTP_USER_AGENT": "wrk",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
            "wsgi.run_once": False}


def _load(redis_url: str, schema, rng) -> dict[str, float]:
    """One feature view in Feast's layout, for entities FIRST..FIRST+ENTITIES; the model's weights."""
    import numpy as np
    import redis

    from pipeline.redis_layout import FeastRedisLayout, loaded_marker

    layout = FeastRedisLayout(schema)
    ids = np.arange(FIRST, FIRST + ENTITIES, dtype=np.int64)
    matrix = rng.normal(50.0, 20.0, size=(ENTITIES, len(schema.feature_names)))
    micros = np.full(ENTITIES, 1_700_000_000_000_000, dtype=np.int64)
    client = redis.Redis.from_url(redis_url)
    conn = client.connection_pool.get_connection()
    try:
        commands = layout.hset(ids, micros, matrix)
        conn.send_packed_command([b"".join(commands)], check_health=False)
        for _ in commands:
            conn.read_response()
    finally:
        client.connection_pool.release(conn)
    client.set(loaded_marker(schema), b"harness")
    return {"feature_names": list(schema.feature_names), "intercept": 3.0,
            "coefficients": list(rng.normal(0.0, 1.0, len(schema.feature_names)))}


class _Watcher:
    """The model watcher's interface, holding one loaded model."""

    last_error = store_error = None

    def __init__(self, model) -> None:
        self.current = model


def _timed(fn, count: int, deadline: float) -> list[float]:
    out = []
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


@contextlib.contextmanager
def _tree(root: Path | None):
    """Imports of ``pipeline`` from ``root`` (another checkout) within the block, this
    checkout's again after it; what was built in the block keeps the other's code."""
    if root is None:
        yield
        return
    ours = {name: sys.modules.pop(name) for name in list(sys.modules)
            if name == "pipeline" or name.startswith("pipeline.")}
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "pipeline" or n.startswith("pipeline.")]:
            del sys.modules[name]
        sys.modules.update(ours)


def _service(args, work: Path, redis_url: str, weights: dict, loop, tag: str) -> dict:
    """The timed layers of one ``pipeline`` package (whichever is imported now)."""
    from pipeline.dataset import CUSTOMERS as schema
    from pipeline.front import call_wsgi, rsgi_app
    from pipeline.mlflow_model import LinearModel
    from pipeline.online import open_online
    from pipeline.model_loading import check_model
    from pipeline.metrics import Metrics
    from pipeline.serve import create_app
    from pipeline.settings import Settings

    settings = Settings(shared_dir=work / f"shared{tag}", redis_url=redis_url, mlflow_tracking_uri=None,
                        prediction_log=args.log, online_timeout_seconds=5.0)
    metrics = Metrics(None if args.single else str(work / "prometheus"))
    online = open_online(settings, schema, on_read=metrics.looked_up, on_unreachable=metrics.lookup_errors.inc)
    model = check_model("harness", 1, "production", LinearModel.from_weights(weights))
    app = create_app(settings, schema=schema, online=online, watcher=_Watcher(model), metrics=metrics,
                     sample_entity=FIRST)
    front = rsgi_app(app, settings)
    query = f"{schema.join_key}={FIRST}"
    post = json.dumps({schema.join_key: FIRST}).encode()
    get_headers = {"host": "127.0.0.1:8000", "user-agent": "wrk"}
    post_headers = {**get_headers, "content-type": "application/json", "content-length": str(len(post))}

    def wsgi_get() -> None:
        status, _, _ = call_wsgi(app, front._environ(_Scope("GET", "/predict", query, get_headers), b""))
        assert status == 200, status

    def rsgi(method: str, headers: dict, body: bytes):
        """Calls of the front inside one running loop, as granian's worker makes them."""
        async def call() -> None:
            protocol = _Protocol(body)
            await front.__rsgi__(_Scope(method, "/predict", query if method == "GET" else "", headers), protocol)
            assert protocol.status == 200, (protocol.status, protocol.payload)

        async def calls(count: int, deadline: float) -> list[float]:
            out = []
            for _ in range(count):
                if time.monotonic() > deadline:
                    break
                t = time.perf_counter()
                await call()
                out.append(time.perf_counter() - t)
            return out
        return lambda count, deadline: loop.run_until_complete(calls(count, deadline))

    def timed(fn):
        return lambda count, deadline: _timed(fn, count, deadline)

    layers = {f"read{tag}": timed(lambda: online.reader.read([FIRST])),
              f"lookup{tag}": timed(lambda: online.lookup([FIRST])),
              f"wsgi GET{tag}": timed(wsgi_get),
              f"rsgi GET{tag}": rsgi("GET", get_headers, b""),
              f"rsgi POST{tag}": rsgi("POST", post_headers, post)}
    return {"layers": layers, "app": app, "pipeline": Path(sys.modules["pipeline"].__file__).parent}


def run(args: argparse.Namespace, work: Path) -> None:
    import numpy as np

    from tests.cluster_support import redis_single

    with redis_single(work / "redis") as redis_url:
        from pipeline.dataset import CUSTOMERS as schema

        weights = _load(redis_url, schema, np.random.default_rng(7))
        os.environ.update({"FLOOR_REDIS_URL": redis_url, "FLOOR_ENTITY": str(FIRST),
                           "FLOOR_COEFFICIENTS": json.dumps(weights["coefficients"])})
        from benchmarks import floor_app

        try:  # the loop granian's workers run ("auto": uvloop where it is installed)
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()

        def floor() -> None:
            b"".join(floor_app.app(_floor_environ(FIRST), lambda status, headers: None))

        services = []
        if args.against:
            with _tree(args.against):
                services.append(_service(args, work, redis_url, weights, loop, " (against)"))
        services.append(_service(args, work, redis_url, weights, loop, ""))
        layers = {"floor": lambda count, deadline: _timed(floor, count, deadline)}
        for name in services[-1]["layers"]:  # side by side: ours, then the other checkout's
            for service in reversed(services):
                layers.update({n: f for n, f in service["layers"].items() if n.startswith(name)})

        for name, fn in layers.items():  # warm up, and check every layer answers
            fn(200, time.monotonic() + 60)
        samples: dict[str, list[float]] = {name: [] for name in layers}
        deadline = time.monotonic() + args.seconds
        for _ in range(args.rounds):
            for name, fn in layers.items():
                samples[name] += fn(args.calls, deadline)
        floor_us = statistics.median(samples["floor"]) * 1e6
        print(f"\nµs per call, median over {args.rounds} interleaved rounds of up to {args.calls} calls "
              f"({type(loop).__module__.split('.')[0]} loop, metrics {'in memory' if args.single else 'multiprocess'}, "
              f"prediction log {'on' if args.log else 'off'}; pipeline from "
              + " and ".join(f"{s['pipeline']}" for s in reversed(services)) + "):")
        width = max(map(len, layers)) + 2
        print(f"{'layer':<{width}}{'calls':>8}{'p50 µs':>10}{'mean µs':>10}{'over floor':>12}")
        for name, values in samples.items():
            p50 = statistics.median(values) * 1e6
            print(f"{name:<{width}}{len(values):>8}{p50:>10.1f}{statistics.fmean(values) * 1e6:>10.1f}"
                  f"{p50 / floor_us:>11.2f}x")

        if args.profile:
            profiler = cProfile.Profile()
            deadline = time.monotonic() + args.seconds
            profiler.enable()
            layers["rsgi POST" if args.profile == "post" else "rsgi GET"](args.profile_calls, deadline)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
            print(f"\ncProfile of rsgi {args.profile.upper()} ({services[-1]['pipeline']}), "
                  f"{args.profile_calls} calls, by own time:")
            print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))
        loop.close()
        for service in services:
            if service["app"].predlog is not None:
                service["app"].predlog.close(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per layer and round (default 2000)")
    parser.add_argument("--seconds", type=float, default=120.0, help="time limit of the timed rounds")
    parser.add_argument("--single", action="store_true", help="metrics in memory, as with one worker")
    parser.add_argument("--log", action="store_true", help="the prediction log on (off in the serving benchmark)")
    parser.add_argument("--profile", choices=["get", "post", "none"], default="get",
                        help="cProfile this request through the RSGI front (default get)")
    parser.add_argument("--profile-calls", type=int, default=5000)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="another checkout (e.g. `git worktree add DIR <commit>`): its pipeline package is "
                             "timed beside this one, in this process")
    args = parser.parse_args(argv)
    args.profile = None if args.profile == "none" else args.profile
    with tempfile.TemporaryDirectory(prefix="predict-profile-") as tmp:
        work = Path(tmp)
        # prometheus-client picks its value storage when first imported: set this first,
        # as `pipeline serve` does for its workers
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if args.single:
            import prometheus_client  # noqa: F401 - in memory, before Feast's import sets the variable
        else:
            (work / "prometheus").mkdir()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(work / "prometheus")
        run(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
