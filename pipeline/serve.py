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

Its metrics, on ``/metrics``, are :mod:`pipeline.metrics`.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from pipeline.api import ARRIVED, JSONHTTPException, json_response, parse_post, parse_query_string, spec
from pipeline.errors import NoModel, PipelineError
from pipeline.metrics import Metrics
from pipeline.schema import Schema
from pipeline.settings import Settings

log = logging.getLogger(__name__)

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
        # () -> (every worker ready, what to say): the serve command's other workers, or None
        self.peers_ready = None
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
        workers_ok, workers_detail = self.peers_ready() if self.peers_ready else (True, None)
        ready = model is not None and store_ok and registry_error is None and workers_ok
        body = {"ready": ready, "model_version": model.version if model else None,
                "online_store": store_detail, "online_store_reachable": store_ok}
        if workers_detail:
            body["workers"] = workers_detail
        if registry_error:
            body["model_registry"] = registry_error
        if self.watcher.last_error:
            body["model_error"] = self.watcher.last_error
        return json_response(body, 200 if ready else 503)

    def is_ready(self) -> bool:
        """This worker's own readiness, without a request: what ``/readyz`` answers
        but for the other workers (:attr:`peers_ready`)."""
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
