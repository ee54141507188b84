"""Stage 6, serve: a werkzeug WSGI app over the Feast online store and the aliased model.

Routes:

- ``GET /predict`` (sample entity), ``GET /predict?customer_id=N``,
  ``POST /predict`` with ``{"customer_id": N}`` or
  ``{"instances": [{"customer_id": N}, ...]}``
- ``GET /metrics`` (Prometheus), ``GET /healthz`` (liveness),
  ``GET /readyz`` (model loaded and online store reachable),
  ``GET /openapi.json`` (this API in OpenAPI 3)

The model follows the registry alias: a background thread checks it every
``MLOPS_MODEL_POLL_SECONDS`` and swaps in a new version once it has loaded and
passed its checks, so no request fails during the swap; a version that fails
to load is logged, counted on ``/metrics`` and the previous model keeps serving.

Deployed, the app runs under granian (``python -m pipeline serve``): worker
processes use both cores despite the GIL, HTTP is parsed in Rust, a crashed
worker is replaced, and SIGTERM drains in-flight requests (what Kubernetes and
compose send).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from pipeline import schema
from pipeline.errors import (BadRequest, NoModel, OnlineStoreUnavailable, PipelineError,
                             UnknownEntity, UnprocessableEntity)
from pipeline.settings import Settings

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5)


# ------------------------------------------------------------------ metrics
class Metrics:
    """The service's Prometheus metrics, on a registry of its own."""

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
                                "Time of one Feast online-store lookup.", buckets=LATENCY_BUCKETS,
                                registry=r)
        self.lookup_errors = Counter("mlops_online_lookup_errors",
                                     "Online-store lookups that failed (store unreachable).", registry=r)
        self.predictions = Counter("mlops_predictions", "Entities predicted.", registry=r)
        self.model_version = Gauge("mlops_model_version", "Registry version of the model being served.",
                                   multiprocess_mode="livemostrecent", registry=r)
        self.model_loads = Counter("mlops_model_loads", "Model versions loaded, by outcome.",
                                   ["outcome"], registry=r)

    def exposition(self) -> bytes:
        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)


# -------------------------------------------------------------------- model
@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    alias: str
    python_model: Any  # pipeline/mlflow_model.py's LinearModel, as MLflow loaded it

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.python_model.predict_array(features)


def load_model_version(name: str, version: int, alias: str, tracking_uri: str) -> LoadedModel:
    """Load a registered version through MLflow and check it fits the schema."""
    import tempfile

    import mlflow

    from pipeline.registry import open_client

    # Resolve the artifacts through this registry explicitly, not MLflow's globals.
    client = open_client(tracking_uri)
    source = client.get_model_version_download_uri(name, str(version))
    with tempfile.TemporaryDirectory(prefix="mlops-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp,
                                                    tracking_uri=tracking_uri)
        loaded = mlflow.pyfunc.load_model(local)
    inner = loaded.unwrap_python_model()
    names = list(getattr(inner, "feature_names", []))
    if names != list(schema.FEATURE_NAMES):
        raise ValueError(f"version {version} expects features {names}, the store serves "
                         f"{list(schema.FEATURE_NAMES)}")
    probe = inner.predict_array(np.zeros((1, len(names))))
    if probe.shape != (1,) or not np.isfinite(probe).all():
        raise ValueError(f"version {version} gives {probe!r} for a zero row")
    return LoadedModel(name, version, alias, inner)


class ModelWatcher:
    """Follows the registry alias; swaps models only once the new one loaded."""

    def __init__(self, settings: Settings, metrics: Metrics, loader=load_model_version) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.current: LoadedModel | None = None
        self.failed_version: int | None = None
        self.last_error: str | None = None
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None  # the registry client, made once it can be (reused by every poll)

    def _alias_target(self) -> int | None:
        from pipeline.registry import alias_version, open_client

        if self._client is None:
            self._client = open_client(self.settings.tracking_uri)
        mv = alias_version(self._client, self.settings.model_name, self.settings.model_alias)
        return int(mv.version) if mv else None

    def refresh(self) -> bool:
        """Check the alias once; returns True when a new model was swapped in."""
        with self._refresh_lock:
            target = self._alias_target()
            if target is None or (self.current and self.current.version == target) \
                    or target == self.failed_version:
                return False
            try:
                model = self.loader(self.settings.model_name, target, self.settings.model_alias,
                                    self.settings.tracking_uri)
            except Exception as exc:  # keep serving the previous model, say why
                self.failed_version, self.last_error = target, f"{type(exc).__name__}: {exc}"
                self.metrics.model_loads.labels("failed").inc()
                log.error("serve: version %s of %s failed to load, still serving %s: %s", target,
                          self.settings.model_name,
                          self.current.version if self.current else "nothing", self.last_error)
                return False
            previous = self.current
            self.current = model  # one reference assignment: requests see old or new, whole
            self.failed_version, self.last_error = None, None
            self.metrics.model_loads.labels("ok").inc()
            self.metrics.model_version.set(target)
            log.info("serve: now serving %s version %d (was %s)", model.name, target,
                     previous.version if previous else "nothing")
            return True

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.model_poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # registry unreachable: keep the current model
                log.warning("serve: could not check the model alias: %s", exc)

    def start(self) -> None:
        try:
            self.refresh()
        except Exception as exc:
            log.warning("serve: could not check the model alias at start: %s", exc)
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------ online store
class OnlineFeatures:
    """Feature lookups in the online store.

    With Redis, straight from Redis in Feast's layout (``RedisOnlineReader``:
    one HMGET, bounded socket timeouts, no retries); with Feast's SQLite store,
    through Feast's SDK.

    Once a lookup finds the store unreachable, lookups fail fast (503, no
    wait) for ``online_backoff_seconds``; then the next one tries the store
    again. So a hung Redis costs one socket timeout per back-off, not one per
    request, and requests do not queue behind each other's timeouts.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = None
        self._redis = None
        self._down_until = 0.0  # monotonic time until which lookups fail fast
        self._last_error: BaseException | None = None
        if settings.redis_url:
            from pipeline.redis_layout import RedisOnlineReader, connect

            self._redis = connect(settings, settings.online_timeout_seconds)
            self._reader = RedisOnlineReader(self._redis)
        else:
            from pipeline.feast import open_store

            self.store = open_store(settings)

    def _read(self, entity_ids: list[int]) -> list[list[float] | None]:
        if self.store is None:
            return self._reader.read(entity_ids)
        from pipeline.feast import online_features

        values = online_features(self.store, entity_ids)
        columns = [values[name] for name in schema.FEATURE_NAMES]
        return [None if any(col[i] is None for col in columns) else [col[i] for col in columns]
                for i in range(len(entity_ids))]

    def lookup(self, entity_ids: list[int]) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Features of each entity, as a matrix in model order and as dicts."""
        started = time.perf_counter()
        if started < self._down_until:
            self.metrics.lookup_errors.inc()
            raise OnlineStoreUnavailable(self._last_error or ConnectionError("store unreachable"))
        try:
            rows = self._read(entity_ids)
        except Exception as exc:
            if _is_unreachable(exc):
                self._last_error = exc
                self._down_until = time.perf_counter() + self.settings.online_backoff_seconds
                self.metrics.lookup_errors.inc()
                raise OnlineStoreUnavailable(exc) from exc
            raise
        finally:
            self.metrics.lookup.observe(time.perf_counter() - started)
        unknown = [e for e, row in zip(entity_ids, rows) if row is None]
        if unknown:
            raise UnknownEntity(schema.JOIN_KEY, unknown)
        matrix = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(schema.FEATURE_NAMES))
        return matrix, [dict(zip(schema.FEATURE_NAMES, row)) for row in rows]

    def reachable(self) -> tuple[bool, str]:
        if self._redis is None:
            path = self.settings.feast_dir / "online_store.db"
            return path.is_file(), f"sqlite {path}"
        try:
            self._redis.ping()
            return True, "redis"
        except Exception as exc:
            return False, f"redis: {type(exc).__name__}: {exc}"


def _is_unreachable(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            ConnectionError, TimeoutError))


# ----------------------------------------------------------- request parsing
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_entity_id(value: Any) -> int:
    """An entity key from JSON or a query string: a non-negative int64."""
    if isinstance(value, bool) or value is None:
        raise UnprocessableEntity(f"{schema.JOIN_KEY} must be an integer, got {json.dumps(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise UnprocessableEntity(f"{schema.JOIN_KEY} must be an integer, got {value!r}")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            raise UnprocessableEntity(f"{schema.JOIN_KEY} must be an integer, got {value[:40]!r}")
        value = int(text)
    if not isinstance(value, int):
        raise UnprocessableEntity(f"{schema.JOIN_KEY} must be an integer, got a {type(value).__name__}")
    if not 0 <= value <= schema.ENTITY_ID_MAX:
        raise UnprocessableEntity(f"{schema.JOIN_KEY} must be between 0 and {schema.ENTITY_ID_MAX}")
    return value


def parse_body(body: bytes, max_batch: int) -> tuple[list[int], bool]:
    """``(entity ids, is_batch)`` from a POST body; raises 400/422 errors."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON ({str(exc)[:120]}); send "
                         f'{{"{schema.JOIN_KEY}": 1000}} or {{"instances": [{{"{schema.JOIN_KEY}": 1000}}]}}'
                         ) from None
    if not isinstance(payload, dict):
        raise UnprocessableEntity(f"request body must be a JSON object, got a {type(payload).__name__}")
    unexpected = sorted(set(payload) - {schema.JOIN_KEY, "instances"})
    if unexpected or len(payload) != 1:
        raise UnprocessableEntity(f'send exactly one of "{schema.JOIN_KEY}" or "instances"'
                                  + (f"; unexpected keys: {unexpected[:5]}" if unexpected else ""))
    if schema.JOIN_KEY in payload:
        return [parse_entity_id(payload[schema.JOIN_KEY])], False
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise UnprocessableEntity('"instances" must be a non-empty list of objects')
    if len(instances) > max_batch:
        raise UnprocessableEntity(f'"instances" holds {len(instances)} items; at most {max_batch} per request')
    ids = []
    for i, item in enumerate(instances):
        if not isinstance(item, dict) or set(item) != {schema.JOIN_KEY}:
            raise UnprocessableEntity(f'instances[{i}] must be {{"{schema.JOIN_KEY}": <integer>}}')
        ids.append(parse_entity_id(item[schema.JOIN_KEY]))
    return ids, True


# -------------------------------------------------------------------- app
class JSONHTTPException(HTTPException):
    """An HTTP error whose body is JSON, never werkzeug's HTML page."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(description=message)
        self.code = code

    def get_body(self, environ=None, scope=None) -> str:
        return json.dumps({"error": self.name, "status": self.code, "message": self.description})

    def get_headers(self, environ=None, scope=None) -> list[tuple[str, str]]:
        return [("Content-Type", "application/json")]


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


class PredictionService:
    def __init__(self, settings: Settings, online: OnlineFeatures, watcher: ModelWatcher,
                 metrics: Metrics, sample_entity: int) -> None:
        self.settings = settings
        self.online = online
        self.watcher = watcher
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
        from pipeline.openapi import spec

        self.openapi = spec(settings.max_batch, settings.max_body_bytes)

    # handlers ---------------------------------------------------------------
    def on_index(self, request: Request) -> Response:
        return json_response({"service": "mlops-shared-volume", "routes": {
            "/predict": f"GET (sample entity), GET ?{schema.JOIN_KEY}=N, POST "
                        f'{{"{schema.JOIN_KEY}": N}} or {{"instances": [...]}}',
            "/metrics": "Prometheus metrics", "/healthz": "liveness", "/readyz": "readiness",
            "/openapi.json": "this API, described in OpenAPI 3"}})

    def on_predict(self, request: Request) -> Response:
        if request.method == "POST":
            request.max_content_length = self.settings.max_body_bytes
            try:
                body = request.get_data(cache=False)
            except RequestEntityTooLarge:
                raise JSONHTTPException(413, f"request body over {self.settings.max_body_bytes} bytes; "
                                             "send fewer instances per request") from None
            ids, batch = parse_body(body, self.settings.max_batch)
        else:
            unexpected = sorted(set(request.args) - {schema.JOIN_KEY})
            if unexpected:
                raise UnprocessableEntity(f"unknown query parameters {unexpected[:5]}; "
                                          f"use ?{schema.JOIN_KEY}=N")
            raw = request.args.getlist(schema.JOIN_KEY)
            if len(raw) > 1:
                raise UnprocessableEntity(f"give {schema.JOIN_KEY} once, or POST a batch")
            ids, batch = ([parse_entity_id(raw[0])] if raw else [self.sample_entity]), False
        model = self.watcher.current  # read once: a swap mid-request cannot mix versions
        if model is None:
            raise NoModel(self.settings.model_name, self.settings.model_alias)
        matrix, features = self.online.lookup(ids)
        predictions = model.predict(matrix)
        self.metrics.predictions.inc(len(ids))
        meta = {"name": model.name, "version": model.version, "alias": model.alias}
        answers = [{schema.JOIN_KEY: e, "prediction": float(p), "features": f}
                   for e, p, f in zip(ids, predictions, features)]
        if batch:
            return json_response({"model": meta, "predictions": answers})
        return json_response({**answers[0], "model": meta})

    def on_openapi(self, request: Request) -> Response:
        return json_response(self.openapi)

    def on_metrics(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    def on_healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    def on_readyz(self, request: Request) -> Response:
        model = self.watcher.current
        store_ok, store_detail = self.online.reachable()
        ready = model is not None and store_ok
        body = {"ready": ready, "model_version": model.version if model else None,
                "online_store": store_detail, "online_store_reachable": store_ok}
        if self.watcher.last_error:
            body["model_error"] = self.watcher.last_error
        return json_response(body, 200 if ready else 503)

    # plumbing ---------------------------------------------------------------
    def dispatch_request(self, request: Request) -> tuple[str, Response]:
        adapter = self.url_map.bind_to_environ(request.environ)
        route = "unmatched"
        try:
            endpoint, values = adapter.match()
            route = f"/{endpoint}" if endpoint != "index" else "/"
            return route, getattr(self, f"on_{endpoint}")(request, **values)
        except PipelineError as exc:
            return route, JSONHTTPException(exc.http_status, exc.message).get_response()
        except JSONHTTPException as exc:
            return route, exc.get_response()
        except HTTPException as exc:
            response = JSONHTTPException(exc.code or 500, exc.description or exc.name).get_response()
            for key, value in exc.get_headers():
                if key.lower() == "allow":
                    response.headers[key] = value
            return route, response
        except Exception:
            log.exception("serve: unexpected error on %s", request.path)
            return route, JSONHTTPException(500, "internal error; see the server log").get_response()

    def wsgi_app(self, environ, start_response):
        started = time.perf_counter()
        request = Request(environ)
        route, response = self.dispatch_request(request)
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)
        self.metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        return response(environ, start_response)

    def __call__(self, environ, start_response):
        return self.wsgi_app(environ, start_response)


def create_app(settings: Settings, *, multiprocess_dir: str | None = None,
               watch: bool = True) -> PredictionService:
    """Build the service: Feast store, model watcher, metrics."""
    from pipeline.ingest import sample_entity
    from pipeline.io import read_record

    metrics = Metrics(multiprocess_dir)
    online = OnlineFeatures(settings, metrics)
    watcher = ModelWatcher(settings, metrics)
    if watch:
        watcher.start()
    else:
        watcher.refresh()
    record = read_record(settings.runs_dir, "ingest")
    sample = int(record.outputs["sample_entity"]) if record else sample_entity()
    return PredictionService(settings, online, watcher, metrics, sample)


# Settings the CLI may take from flags; worker processes rebuild Settings from
# the environment, so run_server hands these on as MLOPS_* variables.
_HANDED_ON = ("shared_dir", "redis_url", "wait_seconds", "host", "port", "workers", "threads")


def app_from_environment() -> PredictionService:
    """The app factory each server worker calls: settings from MLOPS_* variables."""
    import os

    return create_app(Settings(), multiprocess_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def run_server(settings: Settings, multiprocess_dir: str | None = None) -> None:
    """Serve with granian: ``settings.workers`` worker processes, ``settings.threads``
    threads each running the WSGI app.

    granian parses HTTP in Rust, so a request costs the Python workers only the
    app itself: in the benchmark (benchmarks/results) that more than halves
    the CPU per request against gunicorn's Python HTTP parsing. It respawns a
    worker that dies, and drains in-flight requests on SIGTERM (what
    Kubernetes and compose send). With several workers, ``multiprocess_dir``
    must be prometheus-client's ``PROMETHEUS_MULTIPROC_DIR``, set before
    prometheus-client was first imported (the CLI does this), so ``/metrics``
    adds up every worker.
    """
    import os

    from granian.constants import Interfaces
    from granian.server import Server

    from granian.log import LogLevels

    for name in _HANDED_ON:
        value = getattr(settings, name)
        os.environ[f"MLOPS_{name.upper()}"] = "" if value is None else str(value)  # "" is unset
    log.info("serve: http://%s:%d/predict (%d worker(s) x %d thread(s))", settings.host,
             settings.port, settings.workers, settings.threads)
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO  # `-q`
    Server(
        target=f"{__name__}:app_from_environment", factory=True, interface=Interfaces.WSGI,
        address=settings.host, port=settings.port, workers=settings.workers,
        blocking_threads=settings.threads, websockets=False, respawn_failed_workers=True,
        workers_kill_timeout=20, log_access=False,
        log_level=LogLevels.warning if quiet else LogLevels.info,
    ).serve()
