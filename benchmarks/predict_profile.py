"""Where a ``/predict`` request's time goes, in-process: the real request path
against the granian floor's, side by side, and a cProfile of ours.

    python -m benchmarks.predict_profile                 # multiprocess metrics, no prediction log
    python -m benchmarks.predict_profile --log           # with the prediction log on
    python -m benchmarks.predict_profile --single        # metrics in memory (one worker)

A real redis-server on a free 127.0.0.1 port holds one feature view in Feast's
layout (:func:`pipeline.redis_layout.FeastRedisLayout.hset`, as the loader
writes it). The service is :func:`pipeline.serve.create_app` over the real
Redis reader and the real metrics, behind the real RSGI front
(:class:`pipeline.front.RSGIFront`), driven on an asyncio loop as granian
drives it; only the model registry is replaced (a loaded model in memory), and
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


def run(args: argparse.Namespace, work: Path) -> None:
    import numpy as np

    from tests.cluster_support import redis_single

    with redis_single(work / "redis") as redis_url:
        from pipeline.dataset import CUSTOMERS as schema

        weights = _load(redis_url, schema, np.random.default_rng(7))
        os.environ.update({"FLOOR_REDIS_URL": redis_url, "FLOOR_ENTITY": str(FIRST),
                           "FLOOR_COEFFICIENTS": json.dumps(weights["coefficients"])})
        from benchmarks import floor_app
        from pipeline.front import rsgi_app
        from pipeline.mlflow_model import LinearModel
        from pipeline.online import open_online
        from pipeline.registry import check_model
        from pipeline.serve import Metrics, create_app
        from pipeline.settings import Settings

        settings = Settings(shared_dir=work / "shared", redis_url=redis_url, mlflow_tracking_uri=None,
                            prediction_log=args.log, online_timeout_seconds=5.0)
        metrics = Metrics(None if args.single else str(work / "prometheus"))
        online = open_online(settings, schema, on_read=metrics.lookup.observe,
                             on_unreachable=metrics.lookup_errors.inc)
        model = check_model("harness", 1, "production", LinearModel.from_weights(weights))
        app = create_app(settings, schema=schema, online=online, watcher=_Watcher(model), metrics=metrics,
                         sample_entity=FIRST)
        front = rsgi_app(app, settings)
        loop = asyncio.new_event_loop()
        entity = FIRST
        query = f"{schema.join_key}={entity}"
        post = json.dumps({schema.join_key: entity}).encode()
        get_headers = {"host": "127.0.0.1:8000", "user-agent": "wrk"}
        post_headers = {**get_headers, "content-type": "application/json", "content-length": str(len(post))}

        def floor() -> None:
            chunks = floor_app.app(_floor_environ(entity), lambda status, headers: None)
            b"".join(chunks)

        def read() -> None:
            online.reader.read([entity])

        def lookup() -> None:
            online.lookup([entity])

        def wsgi_get() -> None:
            environ = front._environ(_Scope("GET", "/predict", query, get_headers), b"")
            from pipeline.front import call_wsgi

            status, _, _ = call_wsgi(app, environ)
            assert status == 200, status

        def rsgi(method: str, headers: dict, body: bytes):
            async def call() -> None:
                protocol = _Protocol(body)
                await front.__rsgi__(_Scope(method, "/predict", query if method == "GET" else "", headers),
                                     protocol)
                assert protocol.status == 200, (protocol.status, protocol.payload)
            return lambda: loop.run_until_complete(call())

        async def noop() -> None:
            pass

        def loop_only() -> None:
            loop.run_until_complete(noop())

        layers = {"floor": floor, "read": read, "lookup": lookup, "wsgi GET": wsgi_get,
                  "rsgi GET": rsgi("GET", get_headers, b""), "rsgi POST": rsgi("POST", post_headers, post),
                  "(loop hop)": loop_only}
        for fn in layers.values():  # warm up, and check every layer answers
            for _ in range(200):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in layers}
        deadline = time.monotonic() + args.seconds
        for _ in range(args.rounds):
            for name, fn in layers.items():
                samples[name] += _timed(fn, args.calls, deadline)
        floor_us = statistics.median(samples["floor"]) * 1e6
        hop_us = statistics.median(samples["(loop hop)"]) * 1e6
        print(f"\nµs per call, median over {args.rounds} interleaved rounds of up to {args.calls} calls "
              f"(metrics {'in memory' if args.single else 'multiprocess'}, "
              f"prediction log {'on' if args.log else 'off'}; pipeline from {Path(sys.modules['pipeline.serve'].__file__).parent}):")
        print(f"{'layer':<12}{'calls':>8}{'p50 µs':>10}{'mean µs':>10}{'over floor':>12}")
        for name, values in samples.items():
            p50 = statistics.median(values) * 1e6
            # an RSGI call runs on a loop here (one run_until_complete); granian's loop is
            # already running, so the hop is taken off for the ratio
            net = p50 - hop_us if name.startswith("rsgi") else p50
            ratio = f"{net / floor_us:.2f}x" if name != "(loop hop)" else ""
            print(f"{name:<12}{len(values):>8}{p50:>10.1f}{statistics.fmean(values) * 1e6:>10.1f}{ratio:>12}")

        if args.profile:
            target = layers["rsgi POST" if args.profile == "post" else "rsgi GET"]
            profiler = cProfile.Profile()
            deadline = time.monotonic() + args.seconds
            profiler.enable()
            _timed(target, args.profile_calls, deadline)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
            print(f"\ncProfile of rsgi {args.profile.upper()}, {args.profile_calls} calls, by own time:")
            print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))
        loop.close()
        if app.predlog is not None:
            app.predlog.close(timeout=10)


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
