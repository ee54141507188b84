"""Stage 6, serve: a werkzeug WSGI app over the online store and the aliased model.

Routes (the request contract and the OpenAPI document are in :mod:`pipeline.api`):

- ``GET /predict`` (sample entity), ``GET /predict?customer_id=N``,
  ``POST /predict`` with ``{"customer_id": N}`` or
  ``{"instances": [{"customer_id": N}, ...]}``
- ``GET /metrics`` (Prometheus), ``GET /healthz`` (liveness),
  ``GET /readyz`` (model loaded and online store reachable),
  ``GET /openapi.json`` (this API in OpenAPI 3)

The model follows the registry alias (:class:`pipeline.watcher.ModelWatcher`):
it checks the alias every ``MLOPS_MODEL_POLL_SECONDS`` and swaps in a new
version once it has loaded and passed its checks, so no request fails during
the swap; a version that fails to load is logged, counted on ``/metrics``,
tried again with back-off, and the previous model keeps serving; a version
that is not this project's model format is refused without running any of it. Features come from :mod:`pipeline.online`.
``python -m pipeline serve`` runs the app under granian (see :mod:`pipeline.launcher`).

Metrics on ``/metrics`` (every family the service exposes, and nothing else):

- ``mlops_http_requests_total{route,method,status}``: HTTP requests answered, by route, method and status.
- ``mlops_http_request_duration_seconds{route}``: time to answer a request, by route (histogram).
- ``mlops_online_lookup_duration_seconds``: time of one read of the online store (histogram).
- ``mlops_online_lookup_errors_total``: lookups that failed because the online store is unreachable.
- ``mlops_predictions_total``: entities predicted.
- ``mlops_model_version``: registry version of the model being served (0 before the first).
- ``mlops_prediction_log_dropped_total``: served predictions not logged (the log's queue was full).
- ``mlops_model_loads_total{outcome}``: model versions loaded, by outcome (``ok``, ``failed``: tried again
  later, or ``refused``: not this project's model format, never run).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from bisect import bisect_left
from typing import Any

import numpy as np
import orjson
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from pipeline.api import ARRIVED, JSONHTTPException, json_response, parse_post, parse_query_string, spec
from pipeline.errors import NoModel, PipelineError
from pipeline.schema import Schema
from pipeline.settings import Settings

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0  # how often a worker adds what it tallied to the metrics other workers read

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5)


# ------------------------------------------------------------------ metrics
class Metrics:
    """The service's Prometheus metrics (the families listed above), on a registry of its own."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mlops_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("mlops_http_request_duration_seconds",
                                 "Time to answer a request, by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.lookup = Histogram("mlops_online_lookup_duration_seconds",
                                "Time of one read of the online store.", buckets=LATENCY_BUCKETS,
                                registry=r)
        self.lookup_errors = Counter("mlops_online_lookup_errors",
                                     "Online-store lookups that failed (store unreachable).", registry=r)
        self.predictions = Counter("mlops_predictions", "Entities predicted.", registry=r)
        self.model_version = Gauge("mlops_model_version", "Registry version of the model being served.",
                                   multiprocess_mode="livemostrecent", registry=r)
        self.model_loads = Counter("mlops_model_loads", "Model versions loaded, by outcome.",
                                   ["outcome"], registry=r)
        self.log_dropped = Counter("mlops_prediction_log_dropped",
                                   "Served predictions not logged because the log's queue was full.", registry=r)
        self.families = {family.name for family in r.collect()}
        # What the hot path counts is tallied here and added to the metrics in one go
        # (flush): with several workers every inc() of prometheus-client is a locked
        # write to a memory-mapped file, six of them per /predict, about 27 µs of a
        # request's 160 µs in benchmarks/predict_profile.py.
        self._lock = threading.Lock()
        self._tallies: list[_Tally] = []
        # (route, method, status) -> (latency, requests): the labelled children's tallies,
        # made once (``labels()`` takes a lock and builds a key per call)
        self._answered: dict[tuple[str, str, int], tuple[_Tally, _Tally]] = {}
        self._lookups, self._predicted = self._tally(self.lookup), self._tally(self.predictions)
        self._closed = threading.Event()
        if multiprocess_dir:
            # another worker may answer /metrics: what this one tallied gets there within about a second
            threading.Thread(target=self._flush_every, args=(FLUSH_SECONDS,), name="metrics-flush",
                             daemon=True).start()

    def _tally(self, child) -> _Tally:
        tally = _Tally(child)
        self._tallies.append(tally)
        return tally

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and observe its duration."""
        with self._lock:
            tallies = self._answered.get((route, method, status))
            if tallies is None:
                tallies = self._answered[(route, method, status)] = (
                    self._tally(self.latency.labels(route)),
                    self._tally(self.requests.labels(route, method, str(status))))
            tallies[0].observe(seconds)
            tallies[1].add(1)

    def looked_up(self, seconds: float) -> None:
        """Observe the time of one read of the online store."""
        with self._lock:
            self._lookups.observe(seconds)

    def predicted(self, entities: int) -> None:
        """Count entities predicted."""
        with self._lock:
            self._predicted.add(entities)

    def flush(self) -> None:
        """Add what was tallied to the metrics (what ``/metrics`` shows)."""
        with self._lock:
            for tally in self._tallies:
                tally.flush()

    def close(self) -> None:
        """Flush what is tallied and stop the flushing thread."""
        self._closed.set()
        self.flush()

    def _flush_every(self, seconds: float) -> None:
        while not self._closed.wait(seconds):
            try:
                self.flush()
            except Exception:  # an OS error on the shared files: said, and tried again next time
                log.exception("serve: could not write this worker's metrics; retrying in %gs", seconds)

    def model_loaded(self, outcome: str, version: int) -> None:
        self.model_loads.labels(outcome).inc()
        if outcome == "ok":
            self.model_version.set(version)

    def exposition(self) -> bytes:
        self.flush()
        source = self.registry
        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            # The folder holds every metric created in any worker, Feast's own
            # (always zero here) among them: _Only passes on the service's.
            source = multiprocess.MultiProcessCollector(None, path=self.multiprocess_dir)
        exposed = CollectorRegistry(auto_describe=False)
        exposed.register(_Only(source, self.families))
        return generate_latest(exposed)


class _Tally:
    """Observations of one metric child (a histogram's, or a counter's increments)
    kept in this process until :meth:`flush` adds them to the child in one go:
    per histogram bucket, the count observed in it, and the sum.

    A histogram child's buckets and sum are prometheus-client's own values
    (``_upper_bounds``, ``_buckets``, ``_sum``, the same ones its ``observe``
    updates); ``tests/service/test_metrics_tally.py`` holds the exposition to what
    ``observe`` and ``inc`` one at a time give.
    """

    __slots__ = ("child", "bounds", "counts", "total")

    def __init__(self, child) -> None:
        self.child = child
        self.bounds = getattr(child, "_upper_bounds", None)  # None: a counter
        self.counts = [0] * len(self.bounds) if self.bounds else []
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # observe's bucket: the first bound >= value
        self.total += value

    def add(self, amount: float) -> None:
        self.total += amount

    def flush(self) -> None:
        if self.bounds is None:
            if self.total:
                self.child.inc(self.total)
        else:
            for bucket, count in enumerate(self.counts):
                if count:
                    self.child._buckets[bucket].inc(count)
                    self.counts[bucket] = 0
            if self.total:
                self.child._sum.inc(self.total)
        self.total = 0.0


class _Only:
    """The named families of another collector, without their ``_created`` samples
    (creation times that the multi-worker exposition lacks anyway)."""

    def __init__(self, source, names: set[str]) -> None:
        self.source, self.names = source, names

    def collect(self):
        for family in self.source.collect():
            if family.name in self.names:
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


# -------------------------------------------------------------------- app
class PredictionService:
    def __init__(self, settings: Settings, schema: Schema, online: Any, watcher: Any, metrics: Metrics,
                 sample_entity, predlog: Any = None) -> None:
        self.settings = settings
        self.predlog = predlog  # pipeline.predlog.PredictionLog (what the monitor reads), or None
        self.schema = schema
        self.online = online  # pipeline.online.OnlineFeatures, or a stand-in with lookup/reachable
        self.watcher = watcher  # pipeline.watcher.ModelWatcher, or a stand-in with current/last_error
        self.metrics = metrics
        self.sample_entity = sample_entity
        self.url_map = Map([
            Rule("/", endpoint="index", methods=["GET"]),
            Rule("/predict", endpoint="predict", methods=["GET", "POST"]),
            Rule("/metrics", endpoint="metrics", methods=["GET"]),
            Rule("/healthz", endpoint="healthz", methods=["GET"]),
            Rule("/readyz", endpoint="readyz", methods=["GET"]),
            Rule("/openapi.json", endpoint="openapi", methods=["GET"]),
        ])
        self.openapi = spec(schema, settings.max_batch, settings.max_body_bytes)

    # handlers ---------------------------------------------------------------
    def on_index(self, request: Request) -> Response:
        return json_response({"service": "mlops-shared-volume", "routes": {
            "/predict": f"GET (sample entity), GET ?{self.schema.join_key}=<key>, POST "
                        f'{{"{self.schema.join_key}": <key>}} or {{"instances": [...]}}: '
                        f"{self.schema.target} of a {self.schema.entity}",
            "/metrics": "Prometheus metrics", "/healthz": "liveness", "/readyz": "readiness",
            "/openapi.json": "this API, described in OpenAPI 3"}})

    def on_predict(self, request: Request) -> Response:
        # HEAD (or a method not in capitals): wsgi_app answers GET and POST itself
        return Response(self.predict(request.environ, request.method), mimetype="application/json")

    def predict(self, environ: dict, method: str) -> bytes:
        """The JSON body of a ``/predict`` answer (errors are raised, as for any handler).

        Of ``environ`` it reads the query string, the body the front read
        (:data:`pipeline.api.BODY`, else ``wsgi.input``), when the request
        arrived (:data:`pipeline.api.ARRIVED`) and ``X-Request-ID``.
        """
        schema, settings = self.schema, self.settings
        if method == "POST":
            ids, batch = parse_post(environ, schema, max_batch=settings.max_batch,
                                    max_body_bytes=settings.max_body_bytes)
        else:
            ids, batch = parse_query_string(environ.get("QUERY_STRING", ""), self.sample_entity, schema), False
        model = self.watcher.current  # read once: a swap mid-request cannot mix versions
        if model is None:
            raise NoModel(settings.model_name, settings.model_alias)
        matrix, features = self.online.lookup(ids, arrived=environ.get(ARRIVED))
        predictions = np.asarray(model.predict(matrix), dtype=np.float64).tolist()
        self.metrics.predicted(len(ids))
        if self.predlog is not None:
            # Queued for the log's writer thread: never waits, a full queue drops and counts.
            request_id, now = environ.get("HTTP_X_REQUEST_ID") or uuid.uuid4().hex, time.time()
            for key, prediction, values in zip(ids, predictions, features):
                if not self.predlog.append(key, values, prediction, model.version, request_id, now):
                    self.metrics.log_dropped.inc()
        meta = {"name": model.name, "version": model.version, "alias": model.alias}
        key = schema.join_key
        if batch:
            answer = {"model": meta, "predictions": [{key: e, "prediction": p, "features": f}
                                                     for e, p, f in zip(ids, predictions, features)]}
        else:
            answer = {key: ids[0], "prediction": predictions[0], "features": features[0], "model": meta}
        # numpy scalars as numbers; a non-finite value as null (json's NaN is not JSON)
        return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)

    def on_openapi(self, request: Request) -> Response:
        return json_response(self.openapi)

    def on_metrics(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    def on_healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    def on_readyz(self, request: Request) -> Response:
        model = self.watcher.current
        store_ok, store_detail = self.online.reachable()
        registry_error = getattr(self.watcher, "store_error", None)
        ready = model is not None and store_ok and registry_error is None
        body = {"ready": ready, "model_version": model.version if model else None,
                "online_store": store_detail, "online_store_reachable": store_ok}
        if registry_error:
            body["model_registry"] = registry_error
        if self.watcher.last_error:
            body["model_error"] = self.watcher.last_error
        return json_response(body, 200 if ready else 503)

    def is_ready(self) -> bool:
        """What ``/readyz`` answers, without a request."""
        return (self.watcher.current is not None and self.online.reachable()[0]
                and getattr(self.watcher, "store_error", None) is None)

    # plumbing ---------------------------------------------------------------
    def dispatch_request(self, request: Request) -> tuple[str, Response]:
        adapter = self.url_map.bind_to_environ(request.environ)
        route = "unmatched"
        try:
            endpoint, values = adapter.match()
            route = f"/{endpoint}" if endpoint != "index" else "/"
            return route, getattr(self, f"on_{endpoint}")(request, **values)
        except Exception as exc:
            return route, self.error_response(exc, request.path)

    def error_response(self, exc: Exception, path: str) -> Response:
        """The JSON answer to an exception a handler raised."""
        if isinstance(exc, PipelineError):
            return JSONHTTPException(exc.http_status, exc.message).get_response()
        if isinstance(exc, JSONHTTPException):
            return exc.get_response()
        if isinstance(exc, HTTPException):
            response = JSONHTTPException(exc.code or 500, exc.description or exc.name).get_response()
            for key, value in exc.get_headers():
                if key.lower() == "allow":
                    response.headers[key] = value
            return response
        log.error("serve: unexpected error on %s", path, exc_info=exc)
        return JSONHTTPException(500, "internal error; see the server log").get_response()

    def answer_predict(self, environ: dict, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """``(status, headers, body)`` of a GET or POST ``/predict``, counted on ``/metrics``.

        The hot path: what the url map would route to :meth:`on_predict`, answered
        without werkzeug's Request, routing and Response objects (the same body
        and headers; tests/service holds them to the contract). ``environ`` needs
        only what :meth:`predict` reads, so the RSGI front passes those keys alone.
        """
        started = time.perf_counter()
        try:
            body = self.predict(environ, method)
        except Exception as exc:
            response = self.error_response(exc, "/predict")
            status, headers, body = response.status_code, response.headers.to_wsgi_list(), response.get_data()
        else:
            status, headers = 200, [("content-type", "application/json"), ("content-length", str(len(body)))]
        self.metrics.answered("/predict", method, status, time.perf_counter() - started)
        return status, headers, body

    def wsgi_app(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        if environ.get("PATH_INFO") == "/predict" and (method == "GET" or method == "POST"):
            status, headers, body = self.answer_predict(environ, method)
            start_response(f"{status} {HTTP_STATUS_CODES[status]}", headers)
            return [body]
        started = time.perf_counter()
        request = Request(environ)
        route, response = self.dispatch_request(request)
        self.record(route, request.method, response.status_code, time.perf_counter() - started)
        return response(environ, start_response)

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        self.metrics.answered(route, method, status, seconds)

    def route_of(self, path: str) -> str:
        """The route label of a path (what ``/metrics`` counts it under)."""
        try:
            endpoint, _ = self.url_map.bind("localhost").match(path, method="GET")
        except HTTPException:
            return "unmatched"
        return f"/{endpoint}" if endpoint != "index" else "/"

    def __call__(self, environ, start_response):
        return self.wsgi_app(environ, start_response)


def create_app(settings: Settings, *, schema: Schema | None = None, online=None, watcher=None,
               metrics: Metrics | None = None, sample_entity=None, multiprocess_dir: str | None = None,
               watch: bool = True, predlog: Any = None) -> PredictionService:
    """Build the service from its collaborators; each one not given is made from
    ``settings``: the online store (:func:`pipeline.online.open_online`), the model
    watcher (:class:`pipeline.watcher.ModelWatcher`, started here, or with
    ``watch=False`` checked once and left to the caller), the metrics, and the
    sample entity (from the run records), and the data set's schema."""
    from pipeline.io import read_record

    records = {name: read_record(settings.runs_dir, name) for name in ("ingest", "features")}
    if schema is None:
        from pipeline.dataset import schema_for

        schema = schema_for(settings.dataset, records["ingest"])
    metrics = metrics or Metrics(multiprocess_dir)
    if online is None:
        from pipeline.online import open_online

        online = open_online(settings, schema, on_read=metrics.looked_up,
                             on_unreachable=metrics.lookup_errors.inc)
    if watcher is None:
        from pipeline.watcher import ModelWatcher

        watcher = ModelWatcher(settings, on_load=metrics.model_loaded, feature_names=schema.feature_names)
        if watch:
            watcher.start()
        else:
            watcher.refresh()
    if sample_entity is None:
        from pipeline.synthetic import sample_entity as default_sample

        record = records["features"] or records["ingest"]
        sample_entity = record.outputs["sample_entity"] if record else default_sample()
    if predlog is None and settings.prediction_log:
        from pipeline.predlog import PredictionLog, predictions_dir

        predlog = PredictionLog(predictions_dir(settings.shared))
    return PredictionService(settings, schema, online, watcher, metrics, sample_entity, predlog or None)
