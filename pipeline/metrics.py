"""The prediction service's Prometheus metrics, on a registry of its own.

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

A worker tallies what each request counts in memory and adds it to the
metrics about once a second (:data:`FLUSH_SECONDS`), when it answers
``/metrics`` itself, and when it stops (docs/metrics.md).
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0  # how often a worker adds what it tallied to the metrics other workers read

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5)


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
