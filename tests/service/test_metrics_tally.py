"""What the service tallies per request reaches /metrics as if each one were observed on its own."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import FLUSH_SECONDS, LATENCY_BUCKETS, Metrics

# on a bound, between bounds, below the first, past the last (+Inf), zero
SECONDS = [LATENCY_BUCKETS[0], LATENCY_BUCKETS[3], 0.0001, 0.004, 7.5, 0.0, 0.0012, LATENCY_BUCKETS[-1], 0.3]
ANSWERS = [("/predict", "GET", 200), ("/predict", "POST", 422), ("/readyz", "GET", 503), ("/predict", "GET", 200)]


def samples(metrics: Metrics) -> dict:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def feed_tallied(metrics: Metrics) -> None:
    for i, seconds in enumerate(SECONDS):
        metrics.answered(*ANSWERS[i % len(ANSWERS)], seconds)
        metrics.looked_up(seconds / 2)
        metrics.predicted(i + 1)


def feed_one_at_a_time(metrics: Metrics) -> None:
    for i, seconds in enumerate(SECONDS):
        route, method, status = ANSWERS[i % len(ANSWERS)]
        metrics.latency.labels(route).observe(seconds)
        metrics.requests.labels(route, method, str(status)).inc()
        metrics.lookup.observe(seconds / 2)
        metrics.predictions.inc(i + 1)


def test_tallied_requests_expose_the_same_buckets_sums_and_counts_as_observing_each():
    tallied, reference = Metrics(), Metrics()
    feed_tallied(tallied)
    feed_one_at_a_time(reference)
    got = samples(tallied)
    assert got == samples(reference)
    assert got[("mlops_predictions_total", ())] == sum(range(1, len(SECONDS) + 1))
    assert got[("mlops_http_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "/predict")))] == 7
    # a second flush adds nothing twice
    assert samples(tallied) == got


def _worker(folder: str, answered: int, done, stop) -> None:
    """A serving worker: file-backed values, answers requests, never flushes by hand."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    values.ValueClass = values.MultiProcessValue()
    metrics = Metrics(folder)
    for _ in range(answered):
        metrics.answered("/predict", "GET", 200, 0.001)
        metrics.predicted(1)
    done.set()
    stop.wait(60)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_another_workers_tallies_reach_metrics_within_the_flush_interval(tmp_path, monkeypatch):
    ctx = multiprocessing.get_context("fork")
    done, stop = ctx.Event(), ctx.Event()
    worker = ctx.Process(target=_worker, args=(str(tmp_path), 25, done, stop))
    worker.start()
    try:
        assert done.wait(60)
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
        reader = Metrics(str(tmp_path))  # the worker that happens to answer /metrics
        try:
            counted = 0.0
            for _ in range(int(5 * FLUSH_SECONDS / 0.1)):  # bounded: five flush intervals
                counted = samples(reader).get(("mlops_predictions_total", ()), 0.0)
                if counted == 25:
                    break
                stop.wait(0.1)
            assert counted == 25
            assert samples(reader)[("mlops_http_requests_total",
                                    (("method", "GET"), ("route", "/predict"), ("status", "200")))] == 25
        finally:
            reader.close()
    finally:
        stop.set()
        worker.join(30)
